"""The compiled train step and the likelihood solve trace once for inputs of one shape: a
training run or an evaluation loop compiles once, not on every call.

Each check counts traces with `eqx.debug.assert_max_traces(max_traces=1)`, whose counter goes
up on every trace, and then feeds one input of a new shape, which the guard must refuse: that
proves the count is live, so a passing check is not a counter that never moves."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from gaussian_oracle import FORWARDS, gaussian_data, oracle_model

import nfdm_de as nd
import nfdm_de._likelihood

# The linear forward process: its step compiles fastest, and `CompiledTrainStep` wraps
# `train_step` the same way whatever the model.
TINY = nd.TrainConfig(
    data="eight-gaussians",
    model=nd.ModelConfig(forward=nd.ForwardChoice.LINEAR, width=16, depth=1),
    optim=nd.OptimConfig(lr=3e-3, warmup=5, ema_decay=0.9),
    batch_size=32,
)
RETRACE = "can only be traced 1 times"


def _counting(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` whose update is guarded: a train step calls it once per trace, and a new
    optimizer object compiles a step of its own, so the count is this test's alone."""
    return optax.GradientTransformation(
        optimizer.init, eqx.debug.assert_max_traces(optimizer.update, max_traces=1)
    )


def test_compiled_train_step_traces_once():
    """`CompiledTrainStep` (what `train` runs), fed as `train` feeds it: numpy batches, step and
    learning rate that change every call."""
    dtype = jnp.result_type(float)
    data = nd.load_dataset(TINY.data, num=4 * TINY.batch_size).astype(dtype)
    state = nd.init_train_state(TINY, data.shape[1:])
    optimizer = _counting(nd.make_optimizer(TINY.optim))
    step_fn = nd.CompiledTrainStep(
        state,
        optimizer,
        curvature_weight=0.0,
        ema_decay=TINY.optim.ema_decay,
        num_levels=None,
        time_power=TINY.model.time_power,
    )
    batches = data.reshape(4, TINY.batch_size, -1)
    for step in range(3):
        lr = np.asarray(1e-3 * (step + 1), dtype)
        state, breakdown, _ = step_fn(state, batches[step], np.asarray(step), lr)
    assert np.isfinite(float(breakdown.total))
    assert eqx.debug.get_num_traces(optimizer.update) == 1
    with pytest.raises(RuntimeError, match=RETRACE):
        step_fn(state, batches[3][:-1], np.asarray(3), lr)
    assert eqx.debug.get_num_traces(optimizer.update) == 2


def test_likelihood_solve_traces_once(monkeypatch, getkey):
    """`log_likelihood`'s jitted solve, rebuilt with the guard inside its `filter_jit`: repeated
    calls on new data and new probe keys (its solver, tolerances and trace rebuilt on every call
    as a user's code would) reuse the first trace."""
    core = eqx.debug.assert_max_traces(
        nfdm_de._likelihood._log_likelihood_core.__wrapped__, max_traces=1
    )
    monkeypatch.setattr(nfdm_de._likelihood, "_log_likelihood_core", eqx.filter_jit(core))
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["linear"](), mean, cov)

    def solve(x):
        return nd.log_likelihood(
            model, x, key=getkey(), trace=nd.Hutchinson(2), rtol=1e-4, atol=1e-4
        )

    for _ in range(3):
        estimate, _ = solve(jr.normal(getkey(), (8, 2), jnp.float64))
    assert np.all(np.isfinite(np.asarray(estimate.value)))
    assert eqx.debug.get_num_traces(core) == 1
    with pytest.raises(RuntimeError, match=RETRACE):
        solve(jr.normal(getkey(), (7, 2), jnp.float64))
    assert eqx.debug.get_num_traces(core) == 2
