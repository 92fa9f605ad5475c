"""The image U-Net: shapes under jit/vmap, the zero-initialised forward network, gradients, and
an NFDM built from U-Nets training on digits."""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import FINITE_DIFFERENCE_TOL, IDENTITY_TOL

import nfdm_de as nd

# Tiny widths keep the suite fast; the architecture (levels, norms, skips) is the default one.
TINY = dict(base_channels=4)


@pytest.mark.parametrize(
    "shape, channel_mults",
    [
        ((8, 8, 1), (1, 2)),  # digits
        ((28, 28, 1), (1, 2)),  # MNIST
        ((32, 32, 3), (1, 2)),  # CIFAR-10
        ((7, 9, 2), (1, 2, 2)),  # odd sizes: padded to 8 x 12 inside, cropped back
    ],
)
def test_shapes_under_jit_and_vmap(shape, channel_mults, getkey):
    channels = shape[-1]
    net = nd.UNet(channels, 2 * channels, channel_mults=channel_mults, key=getkey(), **TINY)
    x = jr.normal(getkey(), (3, *shape))
    x = x.at[1].set(x[0])  # the same image at two times
    t = jnp.array([0.2, 0.9, 1.0])

    @eqx.filter_jit
    def batched(net, x, t):
        return jax.vmap(net)(x, t)

    y = batched(net, x, t)
    assert y.shape == (3, *shape[:-1], 2 * channels)
    assert bool(jnp.all(jnp.isfinite(y)))
    # Time conditions the output (a time signal that normalisation removed would leave the
    # outputs for the same image equal).
    assert float(jnp.max(jnp.abs(y[1] - y[0]))) > 1e-3


def test_zero_initialised_forward_network_is_the_linear_interpolant(getkey):
    shape = (8, 8, 1)
    forward = nd.unet_neural_gaussian(shape, key=getkey(), **TINY)
    linear = nd.LinearInterpolant(delta=forward.delta)
    x = jr.normal(getkey(), shape)
    z = jr.normal(getkey(), shape)
    t = jnp.array([0.0, 0.3, 0.7, 1.0])

    @eqx.filter_jit
    def moments_and_fields(process):
        moments = jax.vmap(process.mean_and_log_scale, in_axes=(None, 0))(x, t)
        fields = jax.vmap(process.velocity_and_score, in_axes=(None, 0, None))(z, t, x)
        return moments, fields

    (mu, log_sigma), (velocity, score) = moments_and_fields(forward)
    (mu_lin, log_sigma_lin), (velocity_lin, score_lin) = moments_and_fields(linear)
    # The gate times a zero output is exactly zero: the moments agree bit for bit.
    np.testing.assert_array_equal(mu, mu_lin)
    np.testing.assert_array_equal(log_sigma, log_sigma_lin)
    assert float(jnp.max(jnp.abs(velocity - velocity_lin))) < IDENTITY_TOL
    assert float(jnp.max(jnp.abs(score - score_lin))) < IDENTITY_TOL


@pytest.mark.parametrize("skip", [nd.PredictorSkipChoice.GAUSSIAN, nd.PredictorSkipChoice.LINEAR])
def test_predictor_builder_has_the_skip_form(skip, getkey):
    # gaussian: x_hat = a / (a^2 + s^2) z + s / sqrt(a^2 + s^2) UNet(z, t) on the linear path
    # a = 1 - t, s = t + (1 - t) delta (when called without a reference path);
    # linear: x_hat = (1 - t) z + (t + delta) UNet(z, t).
    shape = (8, 8, 1)
    predictor = nd.unet_predictor(shape, skip=skip, key=getkey(), **TINY)
    z = jr.normal(getkey(), shape)
    t = 0.35

    @eqx.filter_jit
    def both(predictor):
        return predictor(z, t), predictor.network(z, t)

    x_hat, out = both(predictor)
    if skip is nd.PredictorSkipChoice.LINEAR:
        expected = (1 - t) * z + (t + predictor.delta) * out
    else:
        a, s = 1 - t, t + (1 - t) * predictor.delta
        expected = a / (a**2 + s**2) * z + s / (a**2 + s**2) ** 0.5 * out
    assert float(jnp.max(jnp.abs(x_hat - expected))) < IDENTITY_TOL


def test_gradient_matches_finite_differences(getkey):
    # A reverse-mode directional derivative through every layer (GroupNorm, strided conv,
    # upsampling, skip concatenation, padding and cropping) against central differences.
    net = nd.UNet(2, 3, channel_mults=(1, 2), key=getkey(), **TINY)
    x = jr.normal(getkey(), (5, 7, 2))
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def f(p):
        return jnp.sum(jnp.sin(eqx.combine(p, static)(x, 0.4)))

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    # (The Fourier frequencies are static floats, not parameters: nothing to perturb there.)
    direction = unravel(jr.normal(getkey(), flat.shape, flat.dtype))

    @jax.jit
    def along(params, direction, s):  # f at params + s * direction: one compilation, two calls
        return f(jax.tree.map(lambda p, d: p + s * d, params, direction))

    grads = jax.jit(jax.grad(f))(params)
    analytic = jnp.vdot(
        jax.flatten_util.ravel_pytree(grads)[0], jax.flatten_util.ravel_pytree(direction)[0]
    )
    h = 1e-5
    numeric = (along(params, direction, h) - along(params, direction, -h)) / (2 * h)
    assert abs(float(analytic - numeric)) < FINITE_DIFFERENCE_TOL * max(1.0, abs(float(numeric)))


def _perturb(module, key, scale):
    # As helpers.perturb, but with one random draw for all parameters: a draw per leaf would
    # compile a random-number kernel per parameter shape.
    params, static = eqx.partition(module, eqx.is_inexact_array)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    return eqx.combine(unravel(flat + scale * jr.normal(key, flat.shape, flat.dtype)), static)


def _digits(batch):
    # Values 0..16 scaled into [-1, 1]; the pipeline's own scaling lives elsewhere.
    images = nd.load_digits_images().images[:batch].astype(np.float64)
    return jnp.asarray(images / 16.0 * 2.0 - 1.0)


def _unet_model(key, forward=None):
    shape = (8, 8, 1)
    k1, k2 = jr.split(key)
    if forward is None:
        forward = nd.unet_neural_gaussian(shape, key=k1, **TINY)
    predictor = nd.unet_predictor(shape, key=k2, **TINY)
    return nd.NFDM(forward, predictor, nd.ConstantVolatility(1.0), data_shape=shape)


@eqx.filter_jit
def _loss_and_grad(model, key, x):
    # Shared by the tests below, so the NFDM's loss and gradient compile once.
    return eqx.filter_value_and_grad(lambda m: nd.loss(m, x, key=key)[0])(model)


def test_gradients_reach_every_layer(getkey):
    # The forward network is perturbed away from its zero output layer, so that its inner
    # layers receive gradient too.
    model = _unet_model(getkey())
    model = eqx.tree_at(lambda m: m.forward, model, _perturb(model.forward, getkey(), 0.1))
    value, grads = _loss_and_grad(model, jr.key(3), _digits(64))
    assert bool(jnp.isfinite(value))
    for part in (grads.forward.network, grads.predictor.network):
        # Fourier frequencies are fixed (stop_gradient); everything else must learn.
        trainable = eqx.tree_at(lambda n: n.time_features, part, replace=None)
        for leaf in map(np.asarray, jax.tree.leaves(trainable)):
            assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0


def test_nfdm_with_unets_trains_on_digits(getkey):
    model = _unet_model(getkey())
    x = _digits(64)
    eval_keys = jr.split(jr.key(123), 4)

    def evaluate(model):
        return np.mean([float(_loss_and_grad(model, k, x)[0]) for k in eval_keys])

    optimiser = optax.adam(3e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def update(model, state, grads):
        # optax's Adam raises a Python float to its int32 step count: not strict-safe.
        with jax.numpy_dtype_promotion("standard"):
            updates, state = optimiser.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state

    before = evaluate(model)
    assert np.isfinite(before)
    # 30 steps: the Gaussian skip starts the predictor at the linear path's posterior mean, so
    # the loss starts low and falls by a small fraction in the first steps (to about 0.9x
    # after 15).
    for key in jr.split(getkey(), 30):
        _, grads = _loss_and_grad(model, key, x)
        model, state = update(model, state, grads)
    after = evaluate(model)
    assert after < 0.92 * before, (before, after)


def test_bad_inputs_raise():
    key = jr.key(0)
    net = nd.UNet(1, 2, key=key, **TINY)
    with pytest.raises(ValueError, match="expects one image of shape"):
        net(jnp.zeros((8, 8, 3)), 0.5)
    with pytest.raises(ValueError, match="image_shape"):
        nd.unet_predictor((64,), key=key)
    with pytest.raises(ValueError, match="channel_mults"):
        nd.UNet(1, 1, channel_mults=(), key=key)
    with pytest.raises(ValueError, match="base_channels"):
        nd.UNet(1, 1, base_channels=0, key=key)
    # Networks built for one channel count do not fit another data shape.
    with pytest.raises(ValueError, match="do not fit data of shape"):
        nd.NFDM(
            nd.unet_neural_gaussian((8, 8, 1), key=key, **TINY),
            nd.unet_predictor((8, 8, 1), key=key, **TINY),
            nd.ConstantVolatility(1.0),
            data_shape=(8, 8, 3),
        )
