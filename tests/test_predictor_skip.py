"""The predictor's skip connection: with the `gaussian` skip and a network that outputs zero,
`NFDM.predict` is the exact posterior mean E[x | z] for standard Gaussian data on the forward
process's reference path (the oracle reads the path from `mean_and_log_scale`, not from
`reference_path`); with the `gaussian-full` skip it is the posterior mean on the learnable
process's corrected path too; the `linear` skip is (1 - t) z + (t + delta) NN, and configs
stored without the setting load with it."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import pytest
from gaussian_oracle import PosteriorMean
from helpers import DATA_SIZE, IDENTITY_TOL, as_f64, perturb

import nfdm_de as nd

TIMES = (0.0, 0.03, 0.3, 0.7, 0.97)


class ZeroNetwork(eqx.Module):
    def __call__(self, z, t):
        return jnp.zeros_like(z)


def _without_correction(forward):
    """The NeuralGaussian with its network's output layer zeroed: exactly its anchor path."""
    return eqx.tree_at(
        lambda f: (f.network.output.weight, f.network.output.bias),
        forward,
        replace_fn=jnp.zeros_like,
    )


def _gaussian_paths(key):
    k1, k2, k3, k4, k5, k6 = jr.split(key, 6)
    mixed = perturb(
        nd.neural_gaussian(DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.MIXED, key=k1),
        k2,
        scale=1.0,
    )
    vp_anchor = perturb(
        nd.neural_gaussian(DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.VP, key=k3), k4
    )
    schedule = perturb(nd.LearnedSchedule(hidden=8, key=k5), k6, scale=1.0)
    # (process whose predictor is tested, the Gaussian path its reference path should be)
    return {
        "linear": (nd.LinearInterpolant(), nd.LinearInterpolant()),
        "vp": (nd.VariancePreserving(delta=0.05), nd.VariancePreserving(delta=0.05)),
        "learned-schedule": (schedule, schedule),
        "neural-gaussian(mixed anchor)": (mixed, _without_correction(mixed)),
        "neural-gaussian(vp anchor)": (vp_anchor, _without_correction(vp_anchor)),
    }


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "vp",
        "learned-schedule",
        "neural-gaussian(mixed anchor)",
        "neural-gaussian(vp anchor)",
    ],
)
def test_gaussian_skip_is_the_posterior_mean_on_the_reference_path(name, getkey):
    forward, path = (as_f64(p) for p in _gaussian_paths(getkey())[name])
    if name == "neural-gaussian(mixed anchor)":
        # The learned anchor weight moved away from 0.5, so the mixture is really tested.
        assert abs(float(forward.vp_weight) - 0.5) > 0.05
    predictor = nd.Predictor(
        ZeroNetwork(), delta=forward.delta, skip=nd.PredictorSkipChoice.GAUSSIAN
    )
    model = nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=(DATA_SIZE,))
    oracle = PosteriorMean(path, jnp.zeros(DATA_SIZE), jnp.eye(DATA_SIZE))
    z = jr.normal(getkey(), (DATA_SIZE,), jnp.float64)
    for t in TIMES:
        t = jnp.asarray(t, jnp.float64)
        got, expected = model.predict(z, t), oracle(z, t)
        assert float(jnp.max(jnp.abs(got - expected))) < IDENTITY_TOL, (name, float(t))


def test_network_scale_and_the_end_points(getkey):
    # x_hat = c_skip z + c_out NN: at t = 0, c_skip = 1 / (1 + delta^2) and c_out = delta /
    # sqrt(1 + delta^2) (the prediction is z up to O(delta)); at t = 1, x_hat = NN exactly.
    delta = 0.02
    network = nd.TimeConditionedMLP(DATA_SIZE, DATA_SIZE, width=8, depth=1, key=getkey())
    predictor = as_f64(nd.Predictor(network, delta=delta))
    z = jr.normal(getkey(), (DATA_SIZE,), jnp.float64)
    for t, c_skip, c_out in (
        (0.0, 1 / (1 + delta**2), delta / (1 + delta**2) ** 0.5),
        (1.0, 0.0, 1.0),
    ):
        t = jnp.asarray(t, jnp.float64)
        expected = c_skip * z + c_out * network(z, t)
        assert float(jnp.max(jnp.abs(predictor(z, t) - expected))) < IDENTITY_TOL


def test_linear_skip_form(getkey):
    network = nd.TimeConditionedMLP(DATA_SIZE, DATA_SIZE, width=8, depth=1, key=getkey())
    predictor = as_f64(nd.Predictor(network, delta=0.01, skip=nd.PredictorSkipChoice.LINEAR))
    z = jr.normal(getkey(), (DATA_SIZE,), jnp.float64)
    t = jnp.asarray(0.35, jnp.float64)
    expected = (1 - t) * z + (t + 0.01) * network(z, t)
    # The reference path a caller passes is ignored by the linear form.
    got = predictor(z, t, (jnp.asarray(0.2), jnp.asarray(0.9)))
    assert float(jnp.max(jnp.abs(got - expected))) < IDENTITY_TOL


def _built_skip(config):
    """The skip of the predictor `build_model` makes for `config`, built abstractly (every
    construction step traced, no initial values computed)."""
    return eqx.filter_eval_shape(nd.build_model, config, (2,), key=jr.key(0)).predictor.skip


def test_the_config_builds_its_skip():
    linear = nd.ModelConfig(predictor_skip=nd.PredictorSkipChoice.LINEAR)
    assert _built_skip(linear) is nd.PredictorSkipChoice.LINEAR
    assert _built_skip(nd.ModelConfig()) is nd.PredictorSkipChoice.GAUSSIAN


def test_a_stored_gaussian_skip_is_kept():
    # A stored skip is what the run is rebuilt with, whatever the current default.
    for skip in ("gaussian", "gaussian-full"):
        stored = nd.TrainConfig().to_dict()
        stored["model"]["predictor_skip"] = skip
        config = nd.TrainConfig.from_dict(stored)
        assert _built_skip(config.model).value == skip


def test_bad_skip_names_the_problem():
    # A string is not a PredictorSkipChoice (the type checker of the tests refuses it first).
    with pytest.raises((ValueError, TypeError), match="skip"):
        nd.Predictor(ZeroNetwork(), skip="gaussian")
    with pytest.raises(ValueError, match="predictor_skip"):
        nd.update_config(nd.TrainConfig(), {"predictor_skip": "cosine"})


def test_reference_path_gradient_reaches_the_anchor_weight(getkey):
    # The skip is built on the learnable mixed anchor, so the objective's gradient reaches w
    # through the predictor as well as through the path.
    forward = nd.neural_gaussian(
        DATA_SIZE, width=8, depth=1, anchor=nd.AnchorChoice.MIXED, key=getkey()
    )
    predictor = nd.Predictor(ZeroNetwork(), delta=forward.delta)
    model = nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=(DATA_SIZE,))
    z = jr.normal(getkey(), (DATA_SIZE,))
    grad = eqx.filter_grad(lambda m: jnp.sum(m.predict(z, 0.4)))(model)
    assert float(jnp.abs(grad.forward.anchor_logit)) > 0


def _with_constant_log_scale_correction(forward, key):
    """The NeuralGaussian whose network outputs a constant, per-coordinate log-scale correction
    c (and no mean correction): the data-independent path mu = a(t) x, sigma_i = s(t) exp(t(1 -
    t) c_i), which the `gaussian` skip (built on the anchor's s(t)) does not match."""
    size = forward.network.out_size // 2
    bias = jnp.concatenate([jnp.zeros(size), 0.8 * jr.normal(key, (size,))])
    forward = eqx.tree_at(lambda f: f.network.output.weight, forward, replace_fn=jnp.zeros_like)
    return eqx.tree_at(lambda f: f.network.output.bias, forward, bias)


def test_full_skip_is_the_posterior_mean_on_the_learned_path(getkey):
    forward = nd.neural_gaussian(
        DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.MIXED, key=getkey()
    )
    forward = as_f64(_with_constant_log_scale_correction(forward, getkey()))
    z = jr.normal(getkey(), (DATA_SIZE,), jnp.float64)
    for skip, should_match in (
        (nd.PredictorSkipChoice.GAUSSIAN_FULL, True),
        (nd.PredictorSkipChoice.GAUSSIAN, False),
    ):
        predictor = nd.Predictor(ZeroNetwork(), delta=forward.delta, skip=skip)
        model = nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=(DATA_SIZE,))
        for t in (0.03, 0.3, 0.7, 0.97):
            t = jnp.asarray(t, jnp.float64)
            # The oracle reads the path from the process itself (mu(1, t) = a, per-coordinate
            # sigma): for standard Gaussian data, E[x_i | z] = a z_i / (a^2 + sigma_i^2).
            mu, log_sigma = forward.mean_and_log_scale(jnp.ones(DATA_SIZE, jnp.float64), t)
            a, sigma = mu[0], jnp.exp(log_sigma)
            assert float(jnp.max(jnp.abs(mu - a))) < IDENTITY_TOL
            expected = a * z / (a**2 + sigma**2)
            error = float(jnp.max(jnp.abs(model.predict(z, t) - expected)))
            if should_match:
                assert error < IDENTITY_TOL, (skip, float(t))
            else:  # the anchor-only skip misses the correction: the test can tell them apart
                assert error > 1e-5, (skip, float(t))


@pytest.mark.parametrize("name", ["linear", "vp", "learned-schedule"])
def test_full_skip_equals_the_gaussian_skip_on_a_fixed_path(name, getkey):
    forward, _ = _gaussian_paths(getkey())[name]
    network = nd.TimeConditionedMLP(DATA_SIZE, DATA_SIZE, width=8, depth=1, key=getkey())
    z = jr.normal(getkey(), (DATA_SIZE,))
    predictions = []
    for skip in (nd.PredictorSkipChoice.GAUSSIAN, nd.PredictorSkipChoice.GAUSSIAN_FULL):
        predictor = nd.Predictor(network, delta=forward.delta, skip=skip)
        model = nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=(DATA_SIZE,))
        predictions.append(jnp.stack([model.predict(z, t) for t in TIMES]))
    assert bool(jnp.all(predictions[0] == predictions[1]))


def test_full_skip_gradient_reaches_the_forward_network(getkey):
    # With `gaussian-full` the objective reaches the forward network through the predictor's
    # skip too; with `gaussian` the skip does not involve the network at all.
    forward = nd.neural_gaussian(
        DATA_SIZE, width=8, depth=1, anchor=nd.AnchorChoice.MIXED, key=getkey()
    )
    z = jr.normal(getkey(), (DATA_SIZE,))
    for skip, reaches in (
        (nd.PredictorSkipChoice.GAUSSIAN_FULL, True),
        (nd.PredictorSkipChoice.GAUSSIAN, False),
    ):
        predictor = nd.Predictor(ZeroNetwork(), delta=forward.delta, skip=skip)
        model = nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=(DATA_SIZE,))
        grad = eqx.filter_grad(lambda m: jnp.sum(m.predict(z, 0.4)))(model)
        # The zero-initialised output layer's weight gets a gradient only through the skip.
        size = float(jnp.sum(jnp.abs(grad.forward.network.output.weight)))
        assert (size > 0) == reaches, skip


def test_full_skip_on_images_uses_the_forward_network_at_zero(getkey):
    shape = (8, 8, 1)
    config = nd.ModelConfig(predictor_skip=nd.PredictorSkipChoice.GAUSSIAN_FULL, channels=4)
    model = nd.build_model(config, shape, key=getkey())
    # Compiled: op by op, each of the U-Net's operations would compile on its own.
    a, sigma = eqx.filter_jit(model.forward.skip_path)(jnp.asarray(0.5), jnp.zeros(shape))
    assert sigma.shape == shape and bool(jnp.all(jnp.isfinite(sigma)))
    z = jr.normal(getkey(), shape)
    assert eqx.filter_jit(model.predict)(z, 0.5).shape == shape
