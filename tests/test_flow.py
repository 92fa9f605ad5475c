"""NeuralFlow, the learnable non-Gaussian forward process (beyond the conformance suite, which
runs over it through `helpers.forward_processes`)."""

import math

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import (
    DATA_SIZE,
    FINITE_DIFFERENCE_TOL,
    IDENTITY_TOL,
    GenericPath,
    max_abs,
)

import nfdm_de as nd

INTERIOR_TIMES = jnp.array([0.013, 0.3, 0.5, 0.87])


@eqx.filter_jit
def _perturb(module, key, scale=0.3):
    """`helpers.perturb` with one normal draw for all the parameters, compiled: drawing each
    parameter shape separately costs a compilation per shape."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    noise = jr.normal(key, flat.shape, flat.dtype)
    return eqx.combine(unravel(flat + scale * noise), static)


@pytest.fixture(scope="module")
def flow():
    """A perturbed flow of the conformance table's configuration (`helpers.forward_processes`),
    built alone."""
    k1, k2 = jr.split(jr.key(42))
    return _perturb(
        nd.neural_flow(DATA_SIZE, width=16, depth=1, num_layers=3, unroll=False, key=k1), k2
    )


def _flow_1d(key, scale=0.3):
    k1, k2 = jr.split(key)
    return _perturb(
        nd.neural_flow(1, width=16, depth=1, num_layers=2, unroll=False, key=k1), k2, scale=scale
    )


@eqx.filter_jit
def _flow_part(flow, eps, t, x):
    """G and G^{-1} with its log-determinant: the coupling stack without the Gaussian anchor."""
    t = jnp.asarray(t, eps.dtype)
    forward = flow._flow_forward(eps, t, x)
    inverse, log_det = flow._flow_inverse(eps, t, x)
    return forward, inverse, log_det


@eqx.filter_jit
def _generic_and_override(flow, z, ts, x):
    generic = GenericPath(flow)
    return (
        jax.vmap(generic.velocity_and_score, (None, 0, None))(z, ts, x),
        jax.vmap(flow.velocity_and_score, (None, 0, None))(z, ts, x),
    )


def test_couplings_are_the_identity_bit_for_bit_at_both_ends(flow, getkey):
    x, eps = jr.normal(getkey(), (2, DATA_SIZE))
    for t in (0.0, 1.0):
        forward, inverse, log_det = _flow_part(flow, eps, t, x)
        assert bool(jnp.array_equal(forward, eps)) and bool(jnp.array_equal(inverse, eps))
        assert float(log_det) == 0.0
        # Hence F is exactly the anchor's map there, which carries the boundary conditions.
        assert bool(jnp.array_equal(flow.transform(eps, t, x), flow.anchor.transform(eps, t, x)))
    forward, _, log_det = _flow_part(flow, eps, 0.5, x)
    assert max_abs(forward, eps) > 1e-3 and abs(float(log_det)) > 1e-3


@pytest.mark.parametrize("data_size", [1, DATA_SIZE])
def test_starts_exactly_at_the_linear_interpolant(data_size, getkey):
    # Same configuration as the conformance table, so the compiled code is shared.
    layers = 3 if data_size == DATA_SIZE else 2
    flow = nd.neural_flow(
        data_size, width=16, depth=1, num_layers=layers, unroll=False, key=getkey()
    )
    linear = nd.LinearInterpolant()
    x, eps = 2.0 * jr.normal(getkey(), (2, data_size))
    for t in INTERIOR_TIMES:
        z = flow.transform(eps, t, x)
        assert max_abs(z, linear.transform(eps, t, x)) < 1e-12
        assert abs(float(flow.log_prob(z, t, x) - linear.log_prob(z, t, x))) < IDENTITY_TOL
        for mine, closed in zip(
            flow.velocity_and_score(z, t, x), linear.velocity_and_score(z, t, x), strict=True
        ):
            assert max_abs(mine, closed) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(closed))))


def test_shared_work_override_matches_the_generic_autodiff_path(flow, getkey):
    x, eps = jr.normal(getkey(), (2, DATA_SIZE))
    z = flow.transform(eps, 0.4, x)
    (v_generic, s_generic), (v_mine, s_mine) = _generic_and_override(flow, z, INTERIOR_TIMES, x)
    for generic, mine in ((v_generic, v_mine), (s_generic, s_mine)):
        assert max_abs(mine, generic) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(generic))))


def test_unrolled_layer_loop_computes_the_same_process(flow, getkey):
    # The default (`unroll=True`, used for speed) and the scan the other tests use are two
    # schedules of the same computation: the same parameters with the loop unrolled.
    scanned = flow
    unrolled = nd.NeuralFlow(
        scanned.anchor,
        scanned.conditioners,
        scanned.masks,
        num_bins=scanned.num_bins,
        bound=scanned.bound,
        unroll=True,
    )
    assert unrolled.unroll and not scanned.unroll and scanned.num_layers > 1
    x, eps = jr.normal(getkey(), (2, DATA_SIZE))

    @eqx.filter_jit
    def fields(process):
        z = process.transform(eps, 0.4, x)
        return (z, *process.velocity_and_score(z, 0.4, x))

    for a, b in zip(fields(unrolled), fields(scanned), strict=True):
        assert max_abs(a, b) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(b))))


def test_one_dimensional_data(getkey):
    # D = 1: nothing to split, every layer's spline depends on (x, t) alone. The conformance
    # checks, condensed.
    flow = _flow_1d(getkey())
    x, eps = jr.normal(getkey(), (2, 1))
    assert max_abs(flow.transform(eps, 0.0, x), x + flow.delta * eps) < 1e-12
    assert max_abs(flow.transform(eps, 1.0, x), eps) < 1e-12
    for t in INTERIOR_TIMES:
        z = flow.transform(eps, t, x)
        assert max_abs(flow.inverse(z, t, x), eps) < IDENTITY_TOL
        # Change of variables with the derivative of F in eps, by autodiff.
        slope = jax.jacfwd(flow.transform)(eps, t, x)[0, 0]
        expected = jax.scipy.stats.norm.logpdf(eps[0]) - jnp.log(jnp.abs(slope))
        assert abs(float(flow.log_prob(z, t, x) - expected)) < IDENTITY_TOL
        velocity, score = flow.velocity_and_score(z, t, x)
        h = 1e-6
        fd = (flow.transform(eps, t + h, x) - flow.transform(eps, t - h, x)) / (2 * h)
        assert max_abs(velocity, fd) < FINITE_DIFFERENCE_TOL * (1 + float(jnp.max(jnp.abs(fd))))
        autodiff = jax.grad(flow.log_prob)(z, t, x)
        assert max_abs(score, autodiff) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(autodiff))))


def _quadrature_moments(log_prob, t, x):
    """Mass, mean, variance, skewness, excess kurtosis and KL to the moment-matched Gaussian of
    a 1-D density, by a Riemann sum on a fine grid (the tails beyond +-12 are negligible)."""
    grid = jnp.linspace(-12.0, 12.0, 24_001)
    dz = grid[1] - grid[0]
    log_q = eqx.filter_jit(jax.vmap(lambda z: log_prob(z[None], t, x)))(grid)
    q = jnp.exp(log_q)
    mass = jnp.sum(q) * dz
    mean = jnp.sum(grid * q) * dz
    var = jnp.sum((grid - mean) ** 2 * q) * dz
    skew = jnp.sum((grid - mean) ** 3 * q) * dz / var**1.5
    kurt = jnp.sum((grid - mean) ** 4 * q) * dz / var**2 - 3
    gaussian = jax.scipy.stats.norm.logpdf(grid, mean, jnp.sqrt(var))
    kl = jnp.sum(q * (log_q - gaussian)) * dz
    return [float(a) for a in (mass, mean, var, skew, kurt, kl)]


def test_marginal_is_genuinely_non_gaussian(getkey):
    t, x = 0.5, jnp.array([0.7])
    flow = _flow_1d(getkey())
    mass, mean, var, skew, kurt, kl = _quadrature_moments(flow.log_prob, t, x)
    # The density integrates to one (a check of log q independent of the conformance suite)...
    assert abs(mass - 1.0) < 1e-5
    # ...and no Gaussian fits it: the moment-matched Gaussian minimises KL(q || N) over all
    # Gaussians, and it is far from zero. Control: a perturbed NeuralGaussian gives ~0.
    assert kl > 1e-2
    gaussian = _perturb(nd.neural_gaussian(1, width=16, depth=1, key=getkey()), getkey())
    control = _quadrature_moments(gaussian.log_prob, t, x)
    assert abs(control[0] - 1.0) < 1e-5 and abs(control[5]) < 1e-6
    # Samples from F agree with the density's skewness and kurtosis (batch means over 20
    # batches; 5 standard errors), and one of them is away from the Gaussian value 0.
    eps = jr.normal(getkey(), (20, 10_000, 1))
    z = eqx.filter_jit(jax.vmap(jax.vmap(lambda e: flow.transform(e, t, x))))(eps)[..., 0]
    centred = z - jnp.mean(z, axis=1, keepdims=True)
    batch_var = jnp.mean(centred**2, axis=1)
    significance = []
    for sample, exact in (
        (jnp.mean(centred**3, axis=1) / batch_var**1.5, skew),
        (jnp.mean(centred**4, axis=1) / batch_var**2 - 3, kurt),
    ):
        stderr = float(jnp.std(sample)) / math.sqrt(sample.shape[0] - 1)
        assert abs(float(jnp.mean(sample)) - exact) < 5 * stderr, (sample, exact)
        significance.append(abs(exact) / stderr)
    assert max(significance) > 5, significance
    assert abs(float(jnp.mean(z)) - mean) < 5 * math.sqrt(var / z.size)


class _OraclePredictor(eqx.Module):
    x: jax.Array

    def __call__(self, z, t):
        return self.x


def test_loss_terms_for_the_true_predictor_and_the_prior(flow, getkey):
    x = 2.0 * jr.normal(getkey(), (DATA_SIZE,))
    model = nd.NFDM(flow, _OraclePredictor(x), nd.ConstantVolatility(0.7), data_shape=(DATA_SIZE,))
    for t in (0.05, 0.5, 0.95):
        breakdown = nd.example_loss(model, x, t, jr.normal(getkey(), (DATA_SIZE,)))
        # Rounding only: the fields at x come from F (jvp) and at x_hat from F^{-1}.
        assert float(breakdown.diffusion) < IDENTITY_TOL**2 and float(breakdown.prior) == 0.0
    assert abs(float(nd.prior_kl(model, x, key=getkey()))) < IDENTITY_TOL


@pytest.mark.slow
def test_loss_trains_it_in_float32(getkey):
    # The library default outside the tests: every parameter and input in float32.
    def f32(tree):
        return jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, tree)

    forward = f32(nd.neural_flow(2, width=16, depth=1, num_layers=2, unroll=False, key=getkey()))
    predictor = f32(nd.mlp_predictor(2, width=32, depth=2, key=getkey()))
    model = nd.NFDM(forward, predictor, f32(nd.ConstantVolatility(1.0)), data_shape=(2,))
    centres = jnp.array([[2.0, 0.0], [-2.0, 0.0]], jnp.float32)
    labels = jr.bernoulli(getkey(), 0.5, (512,)).astype(int)
    data = centres[labels] + 0.3 * jr.normal(getkey(), (512, 2), jnp.float32)

    x, eps = data[0], jr.normal(getkey(), (2,), jnp.float32)
    z = forward.transform(eps, 0.6, x)
    assert z.dtype == jnp.float32 and max_abs(forward.inverse(z, 0.6, x), eps) < 1e-5

    optimiser = optax.adam(3e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, key):
        batch = data[jr.choice(key, data.shape[0], (128,))]
        value, grads = eqx.filter_value_and_grad(lambda m: nd.loss(m, batch, key=key)[0])(model)
        # optax's Adam raises a Python float to its int32 step count: not strict-safe.
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimiser.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
        return eqx.apply_updates(model, updates), opt_state, value, grads

    values = []
    for i in range(200):
        model, opt_state, value, grads = step(model, opt_state, jr.key(i))
        assert value.dtype == jnp.float32 and bool(jnp.isfinite(value))
        values.append(float(value))
        if i == 0:
            # At initialisation every forward output layer is zero, yet the gradient reaches the
            # couplings' and the anchor's output layers.
            for g in (
                grads.forward.conditioners.output.weight,
                grads.forward.anchor.network.output.weight,
            ):
                assert g.dtype == jnp.float32 and float(jnp.max(jnp.abs(g))) > 0
    # The per-step losses are noisy; compare averages of the first and last 20 steps.
    first, last = sum(values[:20]) / 20, sum(values[-20:]) / 20
    assert last < first - 1.0, (first, last)
    # Training moved the couplings away from the identity.
    forward = model.forward
    assert max_abs(forward.transform(eps, 0.5, x), forward.anchor.transform(eps, 0.5, x)) > 0


def test_bad_input_is_rejected_with_a_clear_message(flow, getkey):
    with pytest.raises(ValueError, match=r"vectors of shape \(3,\).*\(4,\)"):
        flow.transform(jnp.zeros(4), 0.5, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"delta.*got"):
        nd.neural_flow(2, delta=0.0, key=getkey())
    with pytest.raises(ValueError, match=r"num_layers.*got 0"):
        nd.neural_flow(2, num_layers=0, key=getkey())
    with pytest.raises(ValueError, match=r"at least one transformed coordinate per layer"):
        nd.NeuralFlow(flow.anchor, flow.conditioners, jnp.zeros((3, 3), bool))
    with pytest.raises(ValueError, match=r"num_bins.*got 1"):
        nd.neural_flow(2, num_bins=1, key=getkey())
    with pytest.raises(ValueError, match=r"conditioners must map size 6 to 33.*got 6 to 46"):
        nd.NeuralFlow(flow.anchor, flow.conditioners, jnp.ones((3, 3), bool), num_bins=4)
