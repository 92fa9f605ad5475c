"""Conformance suite: every forward process obeys the contract of AbstractForwardProcess."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import (
    DATA_SIZE,
    FINITE_DIFFERENCE_TOL,
    FORWARD_NAMES,
    IDENTITY_TOL,
    GenericPath,
    forward_processes,
    max_abs,
    perturb,
)

import nfdm_de as nd

TIMES = [0.0, 0.013, 0.3, 0.5, 0.87, 1.0]
INTERIOR_TIMES = [0.013, 0.3, 0.5, 0.87]


@pytest.fixture(params=FORWARD_NAMES)
def forward(request):
    return forward_processes(jr.key(42))[request.param]


def _point(key):
    kx, ke = jr.split(key)
    return jr.normal(kx, (DATA_SIZE,)) * 2.0, jr.normal(ke, (DATA_SIZE,))


@pytest.mark.parametrize("t", TIMES)
def test_inverse_undoes_transform(forward, getkey, t):
    x, eps = _point(getkey())
    z = forward.transform(eps, t, x)
    assert max_abs(forward.inverse(z, t, x), eps) < IDENTITY_TOL


def test_boundary_conditions_hold_exactly(forward, getkey):
    x, eps = _point(getkey())
    assert max_abs(forward.transform(eps, 0.0, x), x + forward.delta * eps) < 1e-12
    assert max_abs(forward.transform(eps, 1.0, x), eps) < 1e-12


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_velocity_matches_central_difference(forward, getkey, t):
    x, eps = _point(getkey())
    z = forward.transform(eps, t, x)
    h = 1e-6
    fd = (forward.transform(eps, t + h, x) - forward.transform(eps, t - h, x)) / (2 * h)
    velocity = forward.velocity(z, t, x)
    assert max_abs(velocity, fd) < FINITE_DIFFERENCE_TOL * (1 + float(jnp.max(jnp.abs(fd))))


@pytest.mark.parametrize("t", INTERIOR_TIMES)
def test_score_is_gradient_of_log_density(forward, getkey, t):
    x, eps = _point(getkey())
    z = forward.transform(eps, t, x)
    autodiff = jax.grad(forward.log_prob)(z, t, x)
    assert max_abs(forward.score(z, t, x), autodiff) < IDENTITY_TOL * (
        1 + float(jnp.max(jnp.abs(autodiff)))
    )


@pytest.mark.parametrize("t", TIMES)
def test_transform_and_fields_agrees_with_separate_calls(forward, getkey, t):
    x, eps = _point(getkey())
    z, velocity, score = forward.transform_and_fields(eps, t, x)
    assert max_abs(z, forward.transform(eps, t, x)) < IDENTITY_TOL
    v_ref, s_ref = forward.velocity_and_score(z, t, x)
    scale = 1 + float(jnp.max(jnp.abs(s_ref)))
    assert max_abs(velocity, v_ref) < IDENTITY_TOL * scale
    assert max_abs(score, s_ref) < IDENTITY_TOL * scale


def test_log_prob_matches_change_of_variables(forward, getkey):
    # An independent route: log q(z) = log N(eps) - log|det dF/deps|, with the Jacobian of F
    # in eps computed densely by autodiff.
    x, eps = _point(getkey())
    t = 0.4
    z = forward.transform(eps, t, x)
    jac = jax.jacfwd(forward.transform)(eps, t, x)
    expected = jax.scipy.stats.norm.logpdf(eps).sum() - jnp.linalg.slogdet(jac)[1]
    assert abs(float(forward.log_prob(z, t, x) - expected)) < IDENTITY_TOL


def test_works_under_jit_vmap_and_grad(forward, getkey):
    xs = jr.normal(getkey(), (5, DATA_SIZE))
    eps = jr.normal(getkey(), (5, DATA_SIZE))
    ts = jnp.linspace(0.1, 0.9, 5)

    @eqx.filter_jit
    def batch(fwd, eps, ts, xs):
        z = jax.vmap(fwd.transform)(eps, ts, xs)
        v, s = jax.vmap(fwd.velocity_and_score)(z, ts, xs)
        return z, v, s

    z, v, s = batch(forward, eps, ts, xs)
    for i in range(5):
        v_i, s_i = forward.velocity_and_score(z[i], ts[i], xs[i])
        assert max_abs(v[i], v_i) < IDENTITY_TOL
        assert max_abs(s[i], s_i) < IDENTITY_TOL

    def objective(fwd):
        z = jax.vmap(fwd.transform)(eps, ts, xs)
        return jnp.sum(jax.vmap(fwd.velocity)(z, ts, xs) ** 2)

    grads = eqx.filter_grad(objective)(forward)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves)


@pytest.mark.parametrize("name", ["neural-gaussian", "linear", "vp", "learned-schedule"])
def test_generic_autodiff_path_agrees_with_closed_form(name, getkey):
    gaussian = forward_processes(jr.key(42))[name]
    generic = GenericPath(gaussian)
    x, eps = _point(getkey())
    for t in INTERIOR_TIMES:
        z = gaussian.transform(eps, t, x)
        v_closed, s_closed = gaussian.velocity_and_score(z, t, x)
        v_auto, s_auto = generic.velocity_and_score(z, t, x)
        assert max_abs(v_closed, v_auto) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(v_auto))))
        assert max_abs(s_closed, s_auto) < IDENTITY_TOL * (1 + float(jnp.max(jnp.abs(s_auto))))


def test_neural_gaussian_starts_at_linear_interpolant(getkey):
    # Zero-initialised corrections: training starts exactly at the fixed baseline
    # (docs/math.md, "The forward process").
    neural = nd.neural_gaussian(DATA_SIZE, width=16, depth=2, key=getkey())
    linear = nd.LinearInterpolant()
    x, eps = _point(getkey())
    for t in INTERIOR_TIMES:
        assert max_abs(neural.transform(eps, t, x), linear.transform(eps, t, x)) < 1e-12


def test_vp_anchored_neural_gaussian_starts_at_vp(getkey):
    neural = nd.neural_gaussian(
        DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.VP, key=getkey()
    )
    vp = nd.VariancePreserving()
    x, eps = _point(getkey())
    for t in INTERIOR_TIMES:
        assert max_abs(neural.transform(eps, t, x), vp.transform(eps, t, x)) < 1e-12
    # A string is not an AnchorChoice (the type checker of the tests refuses it first).
    with pytest.raises((ValueError, TypeError), match="anchor"):
        nd.neural_gaussian(DATA_SIZE, width=8, depth=1, anchor="cosine", key=getkey())


def test_mixed_anchor_contains_the_linear_and_vp_anchors_and_learns_its_weight(getkey):
    # w = sigmoid(anchor_logit) = 0 / 1 must give the linear / VP-anchored process exactly
    # (same corrections network), and the transform must depend on the logit in between.
    mixed = perturb(
        nd.neural_gaussian(
            DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.MIXED, key=getkey()
        ),
        getkey(),
    )
    assert (
        float(nd.neural_gaussian(DATA_SIZE, anchor=nd.AnchorChoice.MIXED, key=getkey()).vp_weight)
        == 0.5
    )
    x, eps = _point(getkey())
    for logit, anchor in ((-jnp.inf, nd.AnchorChoice.LINEAR), (jnp.inf, nd.AnchorChoice.VP)):
        pinned = eqx.tree_at(lambda f: f.anchor_logit, mixed, jnp.asarray(logit))
        fixed = nd.NeuralGaussian(network=mixed.network, delta=mixed.delta, anchor=anchor)
        for t in INTERIOR_TIMES:
            assert max_abs(pinned.transform(eps, t, x), fixed.transform(eps, t, x)) < 1e-12

    def mixed_sum(logit, t):
        return jnp.sum(eqx.tree_at(lambda f: f.anchor_logit, mixed, logit).transform(eps, t, x))

    for t in INTERIOR_TIMES:
        slope = jax.grad(mixed_sum)(jnp.asarray(0.3), t)
        assert abs(float(slope)) > 1e-4
    assert (
        float(nd.NeuralGaussian(network=mixed.network, anchor=nd.AnchorChoice.MIXED).vp_weight)
        == 0.5
    )
    with pytest.raises(ValueError, match="anchor_logit"):
        nd.NeuralGaussian(
            network=mixed.network, anchor=nd.AnchorChoice.VP, anchor_logit=jnp.zeros(())
        )


def test_learned_schedule_is_monotone_and_starts_near_vp(getkey):
    schedule = nd.LearnedSchedule(hidden=8, key=getkey())
    ts = jnp.linspace(0.0, 1.0, 101)
    h = jax.vmap(schedule.clock)(ts)
    assert float(h[0]) == 0.0 and abs(float(h[-1]) - 1.0) < 1e-12
    assert max_abs(h, ts) < 1e-2
    trained = forward_processes(jr.key(1))["learned-schedule"]
    h = jax.vmap(trained.clock)(ts)
    assert bool(jnp.all(jnp.diff(h) > 0))
    # Signal-to-noise alpha^2/sigma^2 then falls monotonically in t.
    x = jnp.ones(1)
    mu, log_sigma = jax.vmap(lambda t: trained.mean_and_log_scale(x, t))(ts)
    snr = (mu[:, 0] ** 2) * jnp.exp(-2 * log_sigma[:, 0])
    assert bool(jnp.all(jnp.diff(snr) < 0))


@pytest.mark.parametrize("delta", [-0.1, 0.0, 1.5])
def test_bad_delta_is_rejected_with_a_clear_message(delta, getkey):
    for build in (
        lambda: nd.LinearInterpolant(delta=delta),
        lambda: nd.VariancePreserving(delta=delta),
        lambda: nd.LearnedSchedule(delta=delta, key=getkey()),
        lambda: nd.neural_gaussian(2, delta=delta, key=getkey()),
    ):
        with pytest.raises(ValueError, match=r"delta.*got"):
            build()


def test_network_of_wrong_size_is_rejected(getkey):
    bad = nd.NeuralGaussian(network=nd.TimeConditionedMLP(3, 3, width=8, depth=1, key=getkey()))
    with pytest.raises(ValueError, match=r"must return shape \(6,\).*returned \(3,\)"):
        bad.transform(jnp.zeros(3), 0.5, jnp.zeros(3))
