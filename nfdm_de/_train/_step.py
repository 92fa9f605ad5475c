"""One optimiser step: the simulation-free or likelihood objective, AdamW and the EMA, and
`CompiledTrainStep`, the step compiled once for a state's layout."""

import dataclasses
import functools
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from .._bridge import BridgeModel, bridge_loss
from .._data._transform import (
    dequantise,
)
from .._loss import LossBreakdown, loss
from .._ml import LikelihoodSolve, ode_nll_loss
from .._model import NFDM
from ._state import TrainState


def _train_step(
    state: TrainState,
    batch: Float[Array, " batch *shape"],
    step: Array,
    lr: Array,
    optimizer: optax.GradientTransformation,
    *,
    curvature_weight: float,
    ema_decay: float,
    num_levels: int | None,
    time_power: float = 1.0,
    source_batch: Float[Array, " batch dim"] | None = None,
    likelihood: LikelihoodSolve | None = None,
    bound_weight: float = 0.0,
    ema_step: Array | None = None,
    labels: Int[Array, " batch"] | None = None,
) -> tuple[TrainState, LossBreakdown, Array]:
    """One optimiser step on `batch` (in the data's units) at integer `step`, learning rate `lr`.

    A bridge (`state.model` a `BridgeModel`) pairs `batch` with `source_batch` (source units).
    With `likelihood` set the objective is the batch-mean ODE NLL (`ode_nll_loss`, reported as
    the breakdown's `total`) instead of the simulation-free loss, plus `bound_weight` times the
    simulation-free bound of a stochastic model, whose terms fill the rest of the breakdown
    (zeros when `bound_weight` is 0).
    `ema_step` (default `step`) drives the EMA's warm-up, so a phase can restart it.
    `labels`: the class of each example of a class-conditional model (its context).

    Returns the new state, the batch-mean `LossBreakdown` and the gradient's global norm.
    """
    key = jr.fold_in(jr.wrap_key_data(state.key), step)
    dequantise_key, loss_key = jr.split(key)
    x = batch
    if num_levels is not None:
        x = dequantise(x, num_levels, key=dequantise_key)
    x = state.transform.to_model(x)

    params, static = eqx.partition(state.model, eqx.is_inexact_array)

    def objective(params):
        model = eqx.combine(params, static)
        if likelihood is not None:
            nll = ode_nll_loss(model, x, likelihood, key=loss_key, context=labels)
            zero = jnp.zeros((), nll.dtype)
            if bound_weight == 0 or model.is_deterministic:
                return nll, LossBreakdown(nll, zero, zero, zero, zero)
            # The ODE NLL alone moves the predictor and the forward process wherever the ODE's
            # velocity wants them; the SDE's bound, which also compares their scores, then
            # drifts up by nats, and refitting g alone afterwards recovered little of it. A
            # small weight on the bound keeps it (docs/training.md).
            bound_key = jr.fold_in(loss_key, 1)
            bound, terms = loss(model, x, key=bound_key, time_power=time_power, context=labels)
            breakdown = LossBreakdown(nll, terms.diffusion, terms.prior, terms.reconstruction, zero)
            return nll + bound_weight * bound, breakdown
        if isinstance(model, BridgeModel):
            if state.source_transform is None or source_batch is None:
                raise ValueError(
                    "a bridge's train step needs `source_batch` and the state's source_transform."
                )
            source = state.source_transform.to_model(source_batch)
            return bridge_loss(model, x, source, key=loss_key, curvature_weight=curvature_weight)
        return loss(
            model,
            x,
            key=loss_key,
            curvature_weight=curvature_weight,
            time_power=time_power,
            context=labels,
        )

    (_, breakdown), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(params, updates)
    # optax types the updated parameters as its `Params`; combined with `static` they are the
    # model again.
    model = cast(NFDM | BridgeModel, eqx.combine(params, static))
    ema_model = _ema(state.ema_model, params, step if ema_step is None else ema_step, ema_decay)
    new_state = TrainState(
        model, ema_model, opt_state, state.key, state.transform, state.source_transform
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return new_state, breakdown, grad_norm


def _ema(ema_model, params, step: Array, ema_decay: float):
    """The EMA model after one more step towards `params`. Its decay warms up with `step`, so
    early EMA weights are not dominated by the initialisation."""
    # The step is an integer; the decay is computed in the default float dtype and applied in
    # each parameter's own, as standard promotion would (strict promotion refuses both mixes).
    step = jnp.asarray(step).astype(jnp.result_type(float))
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema_params, ema_static = eqx.partition(ema_model, eqx.is_inexact_array)

    def average(e, p):
        d = decay.astype(e.dtype)
        return (d * e + (1 - d) * p).astype(e.dtype)

    return eqx.combine(jax.tree.map(average, ema_params, params), ema_static)


train_step = eqx.filter_jit(_train_step)


@dataclasses.dataclass(frozen=True)
class _StateLayout:
    """A state's tree structure, which of its leaves are arrays, and the other leaves' values
    (Python floats such as delta: constants of the layout). Hashable, so compiled steps can be
    shared between states of one layout."""

    treedef: Any
    is_array: tuple[bool, ...]
    constants: tuple[Any, ...]

    @classmethod
    def of(cls, state: TrainState) -> "_StateLayout":
        leaves, treedef = jax.tree.flatten(state)
        is_array = tuple(eqx.is_array(leaf) for leaf in leaves)
        constants = tuple(None if a else leaf for a, leaf in zip(is_array, leaves, strict=True))
        return cls(treedef, is_array, constants)

    def flatten(self, state: TrainState) -> list[Array]:
        leaves, treedef = jax.tree.flatten(state)
        if treedef != self.treedef:
            raise ValueError(
                "CompiledTrainStep: this state's layout (model, optimiser state) differs from "
                "the one it was compiled for; build a new CompiledTrainStep for it."
            )
        return [leaf for is_array, leaf in zip(self.is_array, leaves, strict=True) if is_array]

    def unflatten(self, arrays: list[Array]) -> TrainState:
        remaining = iter(arrays)
        leaves = [
            next(remaining) if a else c for a, c in zip(self.is_array, self.constants, strict=True)
        ]
        return jax.tree.unflatten(self.treedef, leaves)


def _arrays_step(layout: _StateLayout, optimizer, options: tuple):
    """`train_step` on the flat arrays of a state of `layout`, jitted."""
    step_fn = functools.partial(_train_step, optimizer=optimizer, **dict(options))

    def on_arrays(arrays, batch, step, lr, source_batch, ema_step, labels):
        new_state, breakdown, grad_norm = step_fn(
            layout.unflatten(arrays),
            batch,
            step,
            lr,
            source_batch=source_batch,
            ema_step=ema_step,
            labels=labels,
        )
        return layout.flatten(new_state), breakdown, grad_norm

    return jax.jit(on_arrays)


# A second `train` in one process (another seed, a resumed run) reuses the compiled step.
_cached_arrays_step = functools.lru_cache(maxsize=16)(_arrays_step)


class CompiledTrainStep:
    """`train_step` compiled once for states of one layout; what `train` runs every step.

    `eqx.filter_jit` partitions its arguments into arrays and the rest on every call. For a
    `TrainState` (the model, its EMA copy and Adam's two moments: 100 arrays for the default
    NFDM, 64 for the linear baseline) that Python work costs 1-2 ms per step on a 2-core CPU,
    as long as the step's own computation, and it grows with the number of arrays, so it taxes
    NFDM's larger state twice as much as the baseline's. Here the
    layout is read once: a call flattens the state with `jax.tree.flatten` and hands the
    arrays to a `jax.jit` function as one list, whose dispatch runs in C++. Objects built for
    the same layout and options share one compiled function.

    Results are identical to `train_step` with the same options. A state of another layout
    (another model or optimiser) is refused with a clear error.
    """

    def __init__(
        self,
        like: TrainState,
        optimizer: optax.GradientTransformation,
        *,
        curvature_weight: float,
        ema_decay: float,
        num_levels: int | None,
        time_power: float = 1.0,
        likelihood: LikelihoodSolve | None = None,
        bound_weight: float = 0.0,
    ):
        self._layout = _StateLayout.of(like)
        options = (
            ("curvature_weight", curvature_weight),
            ("ema_decay", ema_decay),
            ("num_levels", num_levels),
            ("time_power", time_power),
            ("likelihood", likelihood),
            ("bound_weight", bound_weight),
        )
        try:
            self._jitted = _cached_arrays_step(self._layout, optimizer, options)
        except TypeError:  # an unhashable constant or option: compile for this object alone
            self._jitted = _arrays_step(self._layout, optimizer, options)

    def __call__(
        self,
        state: TrainState,
        batch: Float[ArrayLike, " batch *shape"],
        step: ArrayLike,
        lr: ArrayLike,
        *,
        source_batch: Float[ArrayLike, " batch dim"] | None = None,
        ema_step: ArrayLike | None = None,
        labels: Int[ArrayLike, " batch"] | None = None,
    ) -> tuple[TrainState, LossBreakdown, Array]:
        """As `train_step(state, batch, step, lr, optimizer, ...)` with this object's options."""
        arrays, breakdown, grad_norm = self._jitted(
            self._layout.flatten(state), batch, step, lr, source_batch, ema_step, labels
        )
        return self._layout.unflatten(arrays), breakdown, grad_norm
