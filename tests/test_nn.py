"""Reference networks: the input Fourier features and the MLP built on them."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import nfdm_de as nd


def test_input_features_are_the_documented_sinusoids():
    features = nd.FourierInputFeatures(3)
    x = jnp.asarray([0.3, -1.2])
    out = np.asarray(features(x))
    assert features.frequencies == (1.0, 2.0, 4.0) and out.shape == (features.size(2),) == (14,)
    angles = np.array([f * v for f in (1.0, 2.0, 4.0) for v in (0.3, -1.2)])
    np.testing.assert_allclose(out, np.concatenate([[0.3, -1.2], np.sin(angles), np.cos(angles)]))
    with pytest.raises(ValueError, match="num_octaves"):
        nd.FourierInputFeatures(0)


def test_mlp_with_input_octaves_resolves_high_frequencies(getkey):
    # The first layer sees sin(f x) for f up to 2^(octaves-1): a network with input octaves can
    # represent a function with period 2 pi / 8 at initialisation scale, a plain one is smooth.
    plain = nd.TimeConditionedMLP(1, 1, width=32, depth=2, key=getkey())
    rich = nd.TimeConditionedMLP(1, 1, width=32, depth=2, input_octaves=4, key=getkey())
    assert rich.layers[0].in_features == 1 + 2 * 4 + rich.time_features.size
    grid = jnp.linspace(-1, 1, 401)[:, None]

    def roughness(net):
        y = np.asarray([net(g, 0.5)[0] for g in grid])
        return np.mean(np.abs(np.diff(y, 2))) / (np.std(y) + 1e-12)

    assert roughness(rich) > 3 * roughness(plain)
    with pytest.raises(ValueError, match="input_octaves"):
        nd.TimeConditionedMLP(1, 1, input_octaves=-1, key=getkey())


def test_config_input_octaves_reach_both_networks_and_old_configs_load(getkey):
    config = nd.ModelConfig(width=8, depth=1, input_octaves=3, forward_input_octaves=2)
    model = nd.build_model(config, (2,), getkey())
    assert model.predictor.network.input_features.frequencies == (1.0, 2.0, 4.0)
    assert model.forward.network.input_features.frequencies == (1.0, 2.0)
    with pytest.raises(ValueError, match="input_octaves"):
        nd.ModelConfig(input_octaves=-1)
    # A stored config lacking a field was written by another version: refused, by name.
    stored = nd.TrainConfig().to_dict()
    del stored["model"]["input_octaves"], stored["model"]["forward_input_octaves"]
    with pytest.raises(ValueError, match="lacks.*'forward_input_octaves', 'input_octaves'"):
        nd.TrainConfig.from_dict(stored)
    # A stored anchor is kept, whatever the default.
    assert nd.TrainConfig().model.forward_anchor is nd.AnchorChoice.MIXED
    stored = nd.TrainConfig().to_dict()
    stored["model"]["forward_anchor"] = "vp"
    assert nd.TrainConfig.from_dict(stored).model.forward_anchor is nd.AnchorChoice.VP


def test_automatic_input_octaves_follow_the_dimension_and_are_stored(getkey, tmp_path):
    auto = nd.ModelConfig(width=8, depth=1)
    assert auto.input_octaves is None

    def octaves(config, dim):
        features = nd.build_model(config, (dim,), getkey()).predictor.network.input_features
        return 0 if features is None else len(features.frequencies)

    # The documented rule: 4 up to 4-D, 2 up to 8-D, none above; explicit values are kept.
    assert [octaves(auto, d) for d in (1, 2, 4, 5, 8, 9, 16)] == [4, 4, 4, 2, 2, 0, 0]
    assert octaves(nd.ModelConfig(width=8, depth=1, input_octaves=3), 16) == 3
    assert nd.resolve_input_octaves(auto, (8, 8, 1)).input_octaves == 0  # U-Nets take none
    # `train` records the chosen value, and resuming with the setting left automatic works.
    path = tmp_path / "eight.npy"
    np.save(path, np.random.default_rng(0).normal(size=(64, 8)))
    config = nd.TrainConfig(
        data=str(path), model=auto, steps=2, batch_size=16, num_train=64, likelihood_steps=0
    )
    nd.train(config, str(tmp_path / "run"))
    stored = nd.load_run(str(tmp_path / "run"))
    assert stored.config.model.input_octaves == 2
    assert len(stored.model.predictor.network.input_features.frequencies) == 2
    assert stored.config.model.predictor_residual is True
    assert stored.model.predictor.network.residual
    longer = nd.train(dataclasses.replace(config, steps=3), str(tmp_path / "run"), resume=True)
    assert longer.steps == 3


def _hand_written_residual_mlp(net, x, t):
    """The residual MLP written out in NumPy from its weights (float64)."""

    def linear(layer, h):
        w = np.asarray(layer.weight, np.float64)
        b = 0.0 if layer.bias is None else np.asarray(layer.bias, np.float64)
        return w @ h + b

    def silu(a):
        return a / (1 + np.exp(-a))

    def rms(h):
        return h / np.sqrt(np.mean(h**2) + 1e-6)

    features = np.asarray(net.time_features(jnp.asarray(t)), np.float64)
    h = silu(
        linear(net.layers[0], np.concatenate([x, features]))
        + linear(net.time_projections[0], features)
    )
    for layer, projection in zip(net.layers[1:], net.time_projections[1:], strict=True):
        h = h + silu(linear(layer, rms(h)) + linear(projection, features))
    return linear(net.output, rms(h))


def test_residual_mlp_matches_its_formula_and_time_derivative(getkey):
    net = nd.TimeConditionedMLP(3, 2, width=16, depth=3, residual=True, key=getkey())
    x, t = np.array([0.3, -1.1, 0.7]), 0.37
    np.testing.assert_allclose(
        np.asarray(net(jnp.asarray(x), t)),
        _hand_written_residual_mlp(net, x, t),
        rtol=1e-5,
        atol=1e-6,
    )
    # Its time derivative (used when it is a forward process's network) against a central
    # difference of the hand-written formula.
    _, rate = net.value_and_time_derivative(jnp.asarray(x), jnp.asarray(t))
    h = 1e-4
    difference = (
        _hand_written_residual_mlp(net, x, t + h) - _hand_written_residual_mlp(net, x, t - h)
    ) / (2 * h)
    np.testing.assert_allclose(np.asarray(rate), difference, rtol=1e-3, atol=1e-4)


def test_automatic_residual_predictor_follows_the_dimension(getkey):
    auto = nd.ModelConfig(width=8, depth=2)
    assert auto.predictor_residual is None

    def residual(config, dim):
        return nd.build_model(config, (dim,), getkey()).predictor.network.residual

    # The documented rule: residual from 5-D to 8-D, plain elsewhere; explicit values are kept.
    assert [residual(auto, d) for d in (2, 4, 5, 8, 9, 16)] == [False] * 2 + [True] * 2 + [
        False
    ] * 2
    assert residual(dataclasses.replace(auto, predictor_residual=True), 2)
    assert not residual(dataclasses.replace(auto, predictor_residual=False), 8)
    assert nd.resolve_predictor_residual(auto, (8, 8, 1)).predictor_residual is False
    # A stored config without the setting holds a plain predictor, and loads as one.
    stored = nd.TrainConfig().to_dict()
    del stored["model"]["predictor_residual"]
    assert nd.TrainConfig.from_dict(stored).model.predictor_residual is False
    with pytest.raises(ValueError, match="predictor_residual"):
        nd.update_config(nd.TrainConfig(), {"predictor_residual": "yes"})
