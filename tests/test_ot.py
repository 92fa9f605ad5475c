"""NFDM-OT: the curvature penalty against finite differences along the ODE path, its zero set,
and its effect in training."""

import functools

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from helpers import DATA_SIZE, perturb

import nfdm_de as nd

FD_TOL = 1e-4


def _curved_model(key):
    k1, k2, k3 = jr.split(key, 3)
    forward = perturb(nd.neural_gaussian(DATA_SIZE, width=16, depth=2, key=k1), k2)
    predictor = nd.mlp_predictor(DATA_SIZE, width=16, depth=2, key=k3)
    return nd.NFDM(forward, predictor, nd.ZeroVolatility())


def _ode_point(model, z, t, s):
    """z(s) on the generative ODE through (z, t), by a tight Dopri8 solve."""
    term = dfx.ODETerm(lambda time, y, _: model.velocity(y, time))
    sol = dfx.diffeqsolve(
        term,
        dfx.Dopri8(),
        t,
        s,
        (s - t) / 4,
        z,
        stepsize_controller=dfx.PIDController(rtol=1e-12, atol=1e-12),
    )
    return sol.ys[0]


def test_curvature_matches_a_finite_difference_of_v_along_the_ode_path(getkey):
    model = _curved_model(getkey())
    z = jr.normal(getkey(), (DATA_SIZE,))
    # Each piece compiled once, with the times as arrays: a Python-float time is a static
    # argument of Diffrax's solve, so every time would compile a solve of its own.
    ode_point = eqx.filter_jit(_ode_point)
    velocity = eqx.filter_jit(lambda model, z, t: model.velocity(z, t))
    curvature = eqx.filter_jit(nd.curvature)
    for t in (0.2, 0.55, 0.9):
        h = 2e-5
        now, after, before = (jnp.asarray(s, z.dtype) for s in (t, t + h, t - h))
        # Central difference of s -> v(z(s), s) on the actual ODE solution: O(h^2) error.
        dv = (
            velocity(model, ode_point(model, z, now, after), after)
            - velocity(model, ode_point(model, z, now, before), before)
        ) / (2 * h)
        expected = float(jnp.sum(dv**2))
        got = float(curvature(model, z, now))
        assert expected > 1e-3  # a genuinely curved field, so the check has teeth
        assert abs(got - expected) <= FD_TOL * max(1.0, expected)
        # Passing the already-known velocity gives the same value.
        again = float(curvature(model, z, now, velocity(model, z, now)))
        assert abs(again - got) <= 1e-10 * max(1.0, got)


def test_loss_breakdown_reports_the_weighted_curvature(getkey):
    model = _curved_model(getkey())
    x, eps = jr.normal(getkey(), (2, DATA_SIZE))
    t = 0.3
    example_loss = eqx.filter_jit(nd.example_loss)  # one compilation per weight, not per operation
    plain = example_loss(model, x, t, eps)
    weighted = example_loss(model, x, t, eps, curvature_weight=2.5)
    z = eqx.filter_jit(model.forward.transform)(eps, t, x)
    expected = float(eqx.filter_jit(nd.curvature)(model, z, t))
    assert float(plain.curvature) == 0.0  # not computed without a weight
    assert abs(float(weighted.curvature) - expected) <= 1e-8 * max(1.0, expected)
    assert abs(float(weighted.total - plain.total) - 2.5 * expected) <= 1e-8 * max(1.0, expected)


@functools.lru_cache(maxsize=1)
def _trained_curvatures():
    """Mean curvature on fixed probe points after the same 60 steps with lambda = 0 and 3."""
    config = nd.TrainConfig(
        model=nd.ModelConfig(
            volatility=nd.VolatilityChoice.ZERO,
            curvature=1.0,
            width=16,
            depth=1,
            forward_width=16,
            forward_depth=1,
        ),
        batch_size=64,
        optim=nd.OptimConfig(lr=1e-2, warmup=0),
    )
    data = jnp.asarray(nd.load_dataset("eight-gaussians", num=2048, seed=0)) / 2.0
    optimiser = nd.make_optimizer(config.optim)
    probe_z = jr.normal(jr.key(5), (256, 2))
    probe_t = jnp.linspace(0.05, 0.95, 256)
    probe_curvatures = eqx.filter_jit(jax.vmap(nd.curvature, in_axes=(None, 0, 0)))
    out = {}
    for weight in (0.0, 3.0):
        state = nd.init_train_state(config, (2,))
        for i in range(60):
            batch = data[jr.randint(jr.key(i), (64,), 0, data.shape[0])]
            state, _, _ = nd.train_step(
                state,
                batch,
                jnp.asarray(i),
                jnp.asarray(1e-2),
                optimiser,
                curvature_weight=weight,
                ema_decay=0.0,
                num_levels=None,
            )
        model = state.model
        values = probe_curvatures(model, probe_z, probe_t)
        out[weight] = (float(jnp.mean(values)), float(jnp.std(values) / jnp.sqrt(256)))
    return out


def test_training_with_the_curvature_penalty_lowers_the_curvature():
    out = _trained_curvatures()
    (c0, se0), (c3, se3) = out[0.0], out[3.0]
    # Lower by more than 3 combined standard errors of the probe-point means.
    assert c3 < c0 - 3 * (se0**2 + se3**2) ** 0.5, out


def test_forward_network_size_settings(getkey):
    # Built abstractly (every construction step traced, no initial values computed): the checks
    # are on the layers' shapes.
    build = functools.partial(eqx.filter_eval_shape, nd.build_model)
    default = nd.ModelConfig()
    model = build(default, (2,), getkey())
    assert [layer.weight.shape for layer in model.forward.network.layers][1:] == [(48, 48)]
    assert len(model.predictor.network.layers) == default.depth == 3
    assert model.predictor.network.layers[-1].weight.shape == (128, 128)
    same = build(nd.ModelConfig(width=8, depth=1, forward_width=None), (2,), getkey())
    assert [layer.weight.shape[0] for layer in same.forward.network.layers] == [8, 8]
    updated = nd.update_config(nd.TrainConfig(), {"forward_width": 32, "forward_depth": 1})
    assert (updated.model.forward_width, updated.model.forward_depth) == (32, 1)
    assert nd.TrainConfig.from_dict(updated.to_dict()) == updated
    # A stored config without the fields loads with a forward network of the predictor's size.
    old = updated.to_dict()
    del old["model"]["forward_width"], old["model"]["forward_depth"]
    loaded = nd.TrainConfig.from_dict(old)
    assert loaded.model.forward_width is None and loaded.model.resolved_forward_width == 128
    for bad in (0, -3, 2.5, "64", True):
        with pytest.raises(ValueError, match="forward_width"):
            nd.update_config(nd.TrainConfig(), {"forward_width": bad})
