"""The NFDM model, volatility and objective."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
import pytest
from helpers import DATA_SIZE, IDENTITY_TOL, forward_processes, max_abs, perturb

import nfdm_de as nd


class OraclePredictor(eqx.Module):
    """Returns the true data point regardless of (z, t)."""

    x: jax.Array

    def __call__(self, z, t):
        return self.x


def _model(key, forward=None, volatility=None, width=16):
    k1, k2, k3 = jr.split(key, 3)
    forward = forward if forward is not None else nd.neural_gaussian(DATA_SIZE, width=width, key=k1)
    volatility = volatility if volatility is not None else nd.LearnedVolatility(key=k3)
    predictor = nd.mlp_predictor(DATA_SIZE, width=width, depth=2, key=k2)
    return nd.NFDM(forward, predictor, volatility)


def test_gradients_reach_forward_predictor_and_volatility(getkey):
    model = _model(getkey())
    x = jr.normal(getkey(), (32, DATA_SIZE))
    grads = eqx.filter_grad(lambda m: nd.loss(m, x, key=jr.key(3))[0])(model)
    forward_out = grads.forward.network.output.weight
    predictor_out = grads.predictor.network.output.weight
    volatility_out = grads.volatility.output.weight
    for g in (forward_out, predictor_out, volatility_out):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


@pytest.mark.parametrize("name", ["neural-gaussian", "linear", "vp", "learned-schedule"])
@pytest.mark.parametrize("volatility", [nd.ConstantVolatility(0.7), nd.ZeroVolatility()])
def test_diffusion_term_vanishes_for_the_true_predictor(name, volatility, getkey):
    forward = forward_processes(jr.key(7))[name]
    x = jr.normal(getkey(), (DATA_SIZE,))
    model = nd.NFDM(forward, OraclePredictor(x), volatility, data_shape=(DATA_SIZE,))
    for t in (0.05, 0.5, 0.95):
        breakdown = nd.example_loss(model, x, t, jr.normal(getkey(), (DATA_SIZE,)))
        # Rounding only: the two sides are computed by different routes (with and without F^{-1}).
        assert float(breakdown.diffusion) < IDENTITY_TOL**2


@pytest.mark.parametrize("name", ["neural-gaussian", "linear", "vp", "learned-schedule"])
def test_prior_term_is_zero(name, getkey):
    forward = forward_processes(jr.key(7))[name]
    model = _model(getkey(), forward=forward)
    x = 3.0 * jr.normal(getkey(), (DATA_SIZE,))
    assert abs(float(nd.prior_kl(model, x, key=getkey()))) < IDENTITY_TOL
    assert float(nd.example_loss(model, x, 0.3, jnp.ones(DATA_SIZE)).prior) == 0.0


def test_reconstruction_term_matches_monte_carlo(getkey):
    model = _model(getkey())
    x = jr.normal(getkey(), (DATA_SIZE,))
    eps = jr.normal(getkey(), (200_000, DATA_SIZE))
    z0 = jax.vmap(lambda e: model.forward.transform(e, 0.0, x))(eps)
    nll = -jax.scipy.stats.norm.logpdf(x, z0, model.delta).sum(-1)
    stderr = float(jnp.std(nll)) / math.sqrt(nll.shape[0])
    assert abs(float(jnp.mean(nll)) - model.reconstruction_nll()) < 4 * stderr


def test_diffusion_term_matches_its_definition(getkey):
    # Recompute L_diff from the public fields, one forward evaluation at a time.
    model = _model(
        getkey(), forward=perturb(nd.neural_gaussian(DATA_SIZE, width=16, key=jr.key(1)), jr.key(2))
    )
    x, eps = jr.normal(getkey(), (2, DATA_SIZE))
    t = 0.37
    z = model.forward.transform(eps, t, x)
    g = model.volatility(t)
    x_hat = model.predict(z, t)
    expected = jnp.sum(
        (model.forward.backward_drift(z, t, x, g) - model.forward.backward_drift(z, t, x_hat, g))
        ** 2
    ) / (2 * g**2)
    breakdown = nd.example_loss(model, x, t, eps)
    assert abs(float(breakdown.diffusion - expected)) < IDENTITY_TOL * (1 + float(expected))
    assert max_abs(model.drift(z, t), model.forward.backward_drift(z, t, x_hat, g)) < IDENTITY_TOL


def test_curvature_is_zero_for_straight_paths_and_positive_otherwise(getkey):
    # Linear interpolant with a predictor that returns a fixed point c: v(z, t) is the velocity of
    # a straight constant-speed line through c's conditional path, so dv/dt along the flow is zero
    # only when sigma is linear and mu linear in t, i.e. for delta -> 0. With a z-independent
    # predictor and the linear path, z_t = (1-t) c + sigma_t eps, v = -c + sigma' eps = const along
    # each trajectory.
    c = jnp.array([1.0, -2.0, 0.5])
    straight = nd.NFDM(
        nd.LinearInterpolant(), OraclePredictor(c), nd.ZeroVolatility(), data_shape=(DATA_SIZE,)
    )
    z = jr.normal(getkey(), (DATA_SIZE,))
    assert float(nd.curvature(straight, z, 0.4)) < 1e-20
    curved = nd.NFDM(
        nd.VariancePreserving(), OraclePredictor(c), nd.ZeroVolatility(), data_shape=(DATA_SIZE,)
    )
    assert float(nd.curvature(curved, z, 0.4)) > 1e-3


def test_training_lowers_the_loss(getkey):
    model = _model(getkey(), volatility=nd.ConstantVolatility(1.0), width=32)
    data = jnp.concatenate(
        [
            jr.normal(getkey(), (256, DATA_SIZE)) * 0.3 + 2.0,
            jr.normal(getkey(), (256, DATA_SIZE)) * 0.3 - 2.0,
        ]
    )
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
        return eqx.apply_updates(model, updates), opt_state, value

    @eqx.filter_jit
    def evaluate(model):
        keys = jr.split(jr.key(123), 16)
        return jnp.mean(jax.vmap(lambda k: nd.loss(model, data, key=k)[0])(keys))

    before = float(evaluate(model))
    for i in range(300):
        model, opt_state, _ = step(model, opt_state, jr.key(i))
    after = float(evaluate(model))
    assert after < before - 1.0, (before, after)


def test_mismatched_dimensions_are_rejected(getkey):
    with pytest.raises(ValueError, match="do not fit data of shape"):
        nd.NFDM(
            nd.neural_gaussian(2, key=getkey()),
            nd.mlp_predictor(3, key=getkey()),
            nd.ConstantVolatility(),
        )


def test_batch_of_wrong_shape_is_rejected(getkey):
    model = _model(getkey())
    with pytest.raises(ValueError, match=r"does not match the model's data shape"):
        nd.loss(model, jnp.zeros((4, DATA_SIZE + 1)), key=getkey())


@pytest.mark.parametrize("floor", [0.0, -1.0])
def test_volatility_floor_must_be_positive(floor, getkey):
    with pytest.raises(ValueError, match=r"floor.*> 0.*got"):
        nd.LearnedVolatility(floor=floor, key=getkey())


def test_volatilities(getkey):
    ts = jnp.linspace(0, 1, 11)
    assert max_abs(jax.vmap(nd.ConstantVolatility(0.5))(ts), 0.5) == 0.0
    assert max_abs(jax.vmap(nd.ZeroVolatility())(ts), 0.0) == 0.0
    assert max_abs(jax.vmap(nd.LinearScheduleVolatility(0.1, 1.0))(ts), 0.1 + 0.9 * ts) < 1e-12
    learned = nd.LearnedVolatility(initial=0.8, floor=0.05, key=getkey())
    assert max_abs(jax.vmap(learned)(ts), 0.8) < 1e-6
    perturbed = perturb(learned, getkey(), scale=3.0)
    assert bool(jnp.all(jax.vmap(perturbed)(ts) >= 0.05))
    with pytest.raises(ValueError, match="positive value"):
        nd.ConstantVolatility(0.0)


def test_stratified_times_cover_each_stratum(getkey):
    t = nd.stratified_times(64, key=getkey())
    assert bool(jnp.all(jnp.floor(t * 64) == jnp.arange(64, dtype=t.dtype)))
