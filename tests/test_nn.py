"""Reference networks: the input Fourier features and the MLP built on them."""

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
    # A stored config without the input-feature fields loads with none.
    stored = nd.TrainConfig().to_dict()
    del stored["model"]["input_octaves"], stored["model"]["forward_input_octaves"]
    loaded = nd.TrainConfig.from_dict(stored)
    assert loaded.model.input_octaves == 0 and loaded.model.forward_input_octaves == 0
    # One without `forward_anchor` loads with the linear anchor; the default for new configs is
    # the learned mixture, and a stored choice is kept.
    assert nd.TrainConfig().model.forward_anchor is nd.AnchorChoice.MIXED
    del stored["model"]["forward_anchor"]
    assert nd.TrainConfig.from_dict(stored).model.forward_anchor is nd.AnchorChoice.LINEAR
    stored["model"]["forward_anchor"] = "vp"
    assert nd.TrainConfig.from_dict(stored).model.forward_anchor is nd.AnchorChoice.VP
