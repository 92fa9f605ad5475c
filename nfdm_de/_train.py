"""Training: optimiser, EMA, the jitted train step, the loop and `load_run`.

The run directory (config, metrics, checkpoints) is a `RunDirectory` (see `_run_dir`).

Exact resume: the randomness of step s is `fold_in(key, s)` and batch s is a pure function of
(data, seed, s) (a grain `MapDataset`), so a run resumed from a checkpoint at step s computes
bit-identical parameters to a run that never stopped.

Data parallelism (see `_sharding`): the batch of every step is sharded over all devices of all
processes and the state is replicated; each process reads only its rows of each batch, and only
process 0 writes the run directory. The global batch is the same as on one device, so is the
loss trajectory (to float rounding of the cross-device sums).
"""

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, TextIO

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, UInt

from ._bridge import BridgeModel, bridge_loss, build_bridge_model
from ._checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, read_header
from ._config import (
    OptimConfig,
    ScheduleChoice,
    TraceChoice,
    TrainConfig,
    build_model,
    check_model_config,
    resolve_likelihood_phase,
)
from ._data import (
    IMAGE_DATASETS,
    AffineDataTransform,
    BatchStream,
    dataset_num_levels,
    dequantise,
    fit_transform,
    is_file_reference,
    load_dataset,
)
from ._loss import LossBreakdown, loss
from ._ml import LikelihoodSolve, ode_nll_loss
from ._model import NFDM
from ._run_dir import (
    CHECKPOINT_DIR,
    RunDirectory,
    check_compatible,
    check_header,
    check_run_directory,
    newest_readable,
)
from ._sharding import (
    barrier,
    data_mesh,
    is_main_process,
    mesh_size,
    process_rows,
    replicate,
    shard_batch,
)
from ._terms import ExactTrace, Hutchinson


class TrainingDiverged(ValueError):
    """The loss became non-finite; the last good checkpoint is kept."""


# --- optimiser and state ------------------------------------------------------------------------


def learning_rate_schedule(config: OptimConfig, steps: int) -> Callable[[int], float]:
    """step -> learning rate: linear warm-up from 0 to `lr` over `warmup` steps, then a cosine
    decay reaching `final_lr_fraction * lr` at `steps` (or a constant rate). A cosine run
    shorter than its warm-up ends the warm-up at `steps - 1`; a constant rate does not depend on
    `steps`, so a run extended by `resume` equals one trained to the new length straight away.

    Computed on the host in plain Python and fed to the jitted step as a number, so the compiled
    step does not depend on the run length (resuming with more steps does not recompile).
    """
    # A cosine decay is shaped by the run's length, so a short run ends its warm-up early to
    # decay at all; a constant rate is not, so that resuming with more steps extends it exactly.
    if config.schedule is ScheduleChoice.CONSTANT:
        warmup = config.warmup
    else:
        warmup = min(config.warmup, max(steps - 1, 0))
    peak, end = config.lr, config.lr * config.final_lr_fraction

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * step / warmup
        if config.schedule is ScheduleChoice.CONSTANT:
            return peak
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))

    return schedule


def run_schedule(config: TrainConfig) -> Callable[[int], float]:
    """step -> learning rate over a whole run: `learning_rate_schedule` for the `steps`
    simulation-free steps, then for the likelihood phase a cosine decay from `likelihood_lr` to
    1% of it over `likelihood_steps` (no warm-up: the phase starts from a trained model)."""
    first = learning_rate_schedule(config.optim, config.steps)
    peak, length = config.likelihood_lr, max(config.likelihood_steps, 1)

    def schedule(step: int) -> float:
        if step < config.steps:
            return first(step)
        progress = min((step - config.steps) / length, 1.0)
        return 0.01 * peak + 0.5 * 0.99 * peak * (1 + math.cos(math.pi * progress))

    return schedule


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW *without* its learning rate: the step
    multiplies the update by -lr(step) (see `learning_rate_schedule`), which is AdamW exactly.

    Cached: the same settings give the same object, so the jitted step (which takes the optimiser
    as a static argument) is not recompiled when a run is resumed in the same process."""
    return _optimizer(
        float(config.clip), float(config.weight_decay), float(config.forward_network_lr_scale)
    )


@functools.lru_cache(maxsize=32)
def _optimizer(
    clip: float, weight_decay: float, forward_network_lr_scale: float = 1.0
) -> optax.GradientTransformation:
    parts = [
        optax.clip_by_global_norm(clip),
        _standard_promotion(optax.scale_by_adam()),
        optax.add_decayed_weights(weight_decay),
    ]
    # Only when asked: an extra link would change the optimiser state's structure, and with it
    # every checkpoint saved before the option existed.
    if forward_network_lr_scale != 1.0:
        parts.append(_scale_forward_network(forward_network_lr_scale))
    return optax.chain(*parts)


def _standard_promotion(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its update traced under JAX's standard dtype promotion.

    optax's Adam raises its Python-float decay rates to its int32 step count (bias correction),
    which strict promotion refuses; under standard promotion, JAX's default, that is a float of
    the default dtype. Its state, and so every checkpoint's layout, is `inner`'s own."""

    def update(updates, state, params=None):
        with jax.numpy_dtype_promotion("standard"):
            return inner.update(updates, state, params)

    return optax.GradientTransformation(inner.init, update)


def _scale_forward_network(scale: float) -> optax.GradientTransformation:
    """Multiplies the updates of `model.forward.network` by `scale` (after AdamW's weight decay,
    so 0 freezes the network exactly). The config allows it for a `NeuralGaussian` only."""

    def update(updates, state, params=None):
        del params
        updates = eqx.tree_at(
            lambda model: model.forward.network,
            updates,
            replace_fn=lambda network: jax.tree.map(lambda u: scale * u, network),
        )
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TrainState(eqx.Module):
    """Everything a checkpoint holds besides its JSON header (step, data-iterator state)."""

    model: NFDM | BridgeModel
    ema_model: NFDM | BridgeModel
    opt_state: Any
    key: UInt[Array, "..."]  # raw key data of the training stream (jr.key_data)
    transform: AffineDataTransform
    # A bridge's source data -> model space (None for an NFDM: no leaves, so NFDM checkpoints
    # are unchanged).
    source_transform: AffineDataTransform | None = None


def _params(model):
    return eqx.filter(model, eqx.is_inexact_array)


def init_train_state(
    config: TrainConfig,
    data_shape: tuple[int, ...],
    transform: AffineDataTransform | None = None,
    source_transform: AffineDataTransform | None = None,
) -> TrainState:
    """A fresh state: model from `config.model` and `config.seed`, EMA = model, optimiser state.

    With `config.source` set the model is a `BridgeModel` and the state holds the source's
    transform too."""
    model_key, train_key = jr.split(jr.key(config.seed))
    if config.source is not None:
        model = build_bridge_model(config.model, data_shape, model_key)
        if source_transform is None:
            source_transform = AffineDataTransform.identity(data_shape[0])
    else:
        model = build_model(config.model, data_shape, model_key)
        source_transform = None
    optimizer = make_optimizer(config.optim)
    opt_state = optimizer.init(_params(model))
    if transform is None:
        transform = AffineDataTransform.identity(tuple(data_shape))
    return TrainState(model, model, opt_state, jr.key_data(train_key), transform, source_transform)


# --- the step -----------------------------------------------------------------------------------


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
) -> tuple[TrainState, LossBreakdown, Array]:
    """One optimiser step on `batch` (in the data's units) at integer `step`, learning rate `lr`.

    A bridge (`state.model` a `BridgeModel`) pairs `batch` with `source_batch` (source units).
    With `likelihood` set the objective is the batch-mean ODE NLL (`ode_nll_loss`, reported as
    the breakdown's `total`) instead of the simulation-free loss, plus `bound_weight` times the
    simulation-free bound of a stochastic model, whose terms fill the rest of the breakdown
    (zeros when `bound_weight` is 0).
    `ema_step` (default `step`) drives the EMA's warm-up, so a phase can restart it.

    Returns the new state, the batch-mean `LossBreakdown` and the gradient's global norm.
    """
    key = jr.fold_in(jr.wrap_key_data(state.key), step)
    dequantise_key, loss_key = jr.split(key)
    x = batch
    if num_levels is not None:
        x = dequantise(dequantise_key, x, num_levels)
    x = state.transform.to_model(x)

    params, static = eqx.partition(state.model, eqx.is_inexact_array)

    def objective(params):
        model = eqx.combine(params, static)
        if likelihood is not None:
            nll = ode_nll_loss(model, x, likelihood, key=loss_key)
            zero = jnp.zeros((), nll.dtype)
            if bound_weight == 0 or model.is_deterministic:
                return nll, LossBreakdown(nll, zero, zero, zero, zero)
            # The ODE NLL alone moves the predictor and the forward process wherever the ODE's
            # velocity wants them; the SDE's bound, which also compares their scores, then
            # drifts up by nats, and refitting g alone afterwards recovered little of it. A
            # small weight on the bound keeps it (docs/training.md).
            bound_key = jr.fold_in(loss_key, 1)
            bound, terms = loss(model, bound_key, x, time_power=time_power)
            breakdown = LossBreakdown(nll, terms.diffusion, terms.prior, terms.reconstruction, zero)
            return nll + bound_weight * bound, breakdown
        if isinstance(model, BridgeModel):
            source = state.source_transform.to_model(source_batch)
            return bridge_loss(model, loss_key, x, source, curvature_weight=curvature_weight)
        return loss(model, loss_key, x, curvature_weight=curvature_weight, time_power=time_power)

    (_, breakdown), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(params, updates)
    model = eqx.combine(params, static)
    # EMA whose decay warms up, so early EMA weights are not dominated by the initialisation.
    ema_step = step if ema_step is None else ema_step
    # The step is an integer; the decay is computed in the default float dtype and applied in
    # each parameter's own, as standard promotion would (strict promotion refuses both mixes).
    ema_step = jnp.asarray(ema_step).astype(jnp.result_type(float))
    decay = jnp.minimum(ema_decay, (1.0 + ema_step) / (10.0 + ema_step))
    ema_params, ema_static = eqx.partition(state.ema_model, eqx.is_inexact_array)

    def average(e, p):
        d = decay.astype(e.dtype)
        return (d * e + (1 - d) * p).astype(e.dtype)

    ema_params = jax.tree.map(average, ema_params, params)
    ema_model = eqx.combine(ema_params, ema_static)
    new_state = TrainState(
        model, ema_model, opt_state, state.key, state.transform, state.source_transform
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return new_state, breakdown, grad_norm


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

    def on_arrays(arrays, batch, step, lr, source_batch, ema_step):
        new_state, breakdown, grad_norm = step_fn(
            layout.unflatten(arrays), batch, step, lr, source_batch=source_batch, ema_step=ema_step
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
    ) -> tuple[TrainState, LossBreakdown, Array]:
        """As `train_step(state, batch, step, lr, optimizer, ...)` with this object's options."""
        arrays, breakdown, grad_norm = self._jitted(
            self._layout.flatten(state), batch, step, lr, source_batch, ema_step
        )
        return self._layout.unflatten(arrays), breakdown, grad_norm


# --- run directories ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained run, ready for evaluation.

    - `model`: the NFDM with the EMA weights (cast to the current default float dtype);
    - `config`: the resolved `TrainConfig`;
    - `transform`: the `AffineDataTransform` data -> model space (`to_model`, `from_model`,
      `log_det`); NLL in data units is `nll_model - transform.log_det()`;
    - `dataset`: the built-in dataset name or the data file's path the run was trained on;
    - `num_levels`: K for dequantised integer data (digits: 17), else None; then the transform
      acts on y = (x + u) / K;
    - `step`: the optimiser step of the checkpoint; `path`: its file;
    - `raw_model`: the non-averaged weights.
    """

    model: NFDM | BridgeModel
    config: TrainConfig
    transform: AffineDataTransform
    dataset: str
    num_levels: int | None
    step: int
    path: str
    raw_model: NFDM | BridgeModel
    # Bridges: the source's data -> model transform (None for an NFDM); the source is
    # `config.source`.
    source_transform: AffineDataTransform | None = None
    # (path, reason) of each newer checkpoint that could not be read and was skipped.
    skipped: tuple[tuple[str, str], ...] = ()


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _state_skeleton(config: TrainConfig, header: dict[str, Any]) -> TrainState:
    data_shape = tuple(header["data_shape"])
    skeleton = eqx.filter_eval_shape(init_train_state, config, data_shape)
    # The checkpoint may have been written in another float precision (float32 outside tests).
    dtype = jnp.dtype(header.get("dtype", "float32"))

    def retype(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(leaf.shape, dtype)
        return leaf

    return jax.tree.map(retype, skeleton)


def _load_training_checkpoint(path: str) -> tuple[dict[str, Any], TrainConfig, TrainState]:
    """(header, stored config, state) of a checkpoint written by `train`, every header field
    checked before anything is built from it."""
    header = read_header(path)
    config = check_header(path, header)
    _, state = load_checkpoint(path, _state_skeleton(config, header))
    return header, config, state


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Load the newest readable checkpoint of the run in `run_dir` (EMA weights as `.model`).

    A newer checkpoint that cannot be read (empty, truncated, tampered) is skipped and named in
    `LoadedRun.skipped`; when none can be read the error names the newest and why."""
    run_dir = os.fspath(run_dir)
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    loaded, skipped = newest_readable(directory, _load_training_checkpoint)
    if loaded is None:
        if skipped:
            path, reason = skipped[0]
            raise ValueError(
                f"no checkpoint of {run_dir!r} can be read; the newest, {path!r}: {reason}"
            )
        raise ValueError(
            f"{run_dir!r} holds no nfdm-de checkpoint (expected {CHECKPOINT_DIR}/step_*.eqx); "
            "train one with `nfdm-de train --run-dir ...`."
        )
    header, config, state = loaded
    dtype = jnp.result_type(float)
    return LoadedRun(
        model=_cast_floats(state.ema_model, dtype),
        config=config,
        transform=_cast_floats(state.transform, dtype),
        dataset=config.data,
        num_levels=header["num_levels"],
        step=header["step"],
        path=checkpoint_path(directory, header["step"]),
        raw_model=_cast_floats(state.model, dtype),
        source_transform=_cast_floats(state.source_transform, dtype),
        skipped=tuple(skipped),
    )


# --- the loop -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainResult:
    run_dir: str
    steps: int
    final_loss: float
    seconds: float
    resumed_from: int
    checkpoint: str | None
    devices: int = 1
    processes: int = 1
    # Batch-mean loss terms (diffusion, prior, reconstruction, curvature) over the last logged
    # interval of this call; empty when it ran no step.
    final_terms: dict[str, float] = dataclasses.field(default_factory=dict)


class _Progress:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, stream: TextIO | None, start: int):
        self.total, self.stream, self.start = total, stream, start
        self.tty = stream is not None and stream.isatty()
        self.last = 0.0

    def update(
        self,
        step: int,
        loss: float,
        rate: float,
        force: bool = False,
        curvature: float | None = None,
    ) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        frac = step / self.total
        bar = "#" * int(25 * frac) + "." * (25 - int(25 * frac))
        extra = "" if curvature is None else f"  curvature {curvature:.4f}"
        text = f"[{bar}] {step}/{self.total}  loss {loss:.4f}{extra}  {rate:.1f} steps/s"
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _tree_is_finite(tree) -> bool:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    # numpy on the host: no per-shape compilation of a tiny reduction.
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in leaves)


@dataclasses.dataclass(frozen=True)
class _Data:
    """A run's training data (in the data's units), validated before anything is written."""

    train: np.ndarray
    source: np.ndarray | None
    num_levels: int | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def _with_absolute_paths(config: TrainConfig) -> TrainConfig:
    if is_file_reference(config.data):
        config = dataclasses.replace(config, data=os.path.abspath(config.data))
    if config.source is not None and is_file_reference(config.source):
        config = dataclasses.replace(config, source=os.path.abspath(config.source))
    return config


def _load_data(config: TrainConfig) -> _Data:
    finite = is_file_reference(config.data) or config.data in ("digits", *IMAGE_DATASETS)
    num = None if finite else config.num_train
    data = load_dataset(config.data, split="train", num=num, seed=config.seed)
    num_levels = dataset_num_levels(config.data)
    source_data = None
    if config.source is not None:
        source_num = None if is_file_reference(config.source) else config.num_train
        # The source's own random stream (seed + 1), independent of the target's.
        source_data = load_dataset(
            config.source, split="train", num=source_num, seed=config.seed + 1
        )
        if source_data.shape[1:] != data.shape[1:]:
            raise ValueError(
                f"the source {config.source!r} has examples of shape {source_data.shape[1:]} but "
                f"the target {config.data!r} has {data.shape[1:]}; a bridge needs one dimension."
            )
        if num_levels is not None or dataset_num_levels(config.source) is not None:
            raise ValueError("bridges support continuous data only (no integer-valued sets).")
    return _Data(data, source_data, num_levels)


def _resolve_for_data(config: TrainConfig, data: _Data) -> TrainConfig:
    config = resolve_likelihood_phase(config, data.shape, discrete=data.num_levels is not None)
    if config.likelihood_steps > 0 and (config.source is not None or len(data.shape) != 1):
        raise ValueError(
            "the likelihood phase (likelihood_steps > 0) needs an NFDM on vector data: its exact "
            f"trace costs D network evaluations per ODE step; got data of shape {data.shape}"
            + (" and a bridge (--source)." if config.source is not None else ".")
        )
    return config


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where a call of `train` starts: a fresh state at step 0 or a restored checkpoint."""

    state: TrainState
    step: int
    loss: float
    iterator_state: dict | None = None
    source_iterator_state: dict | None = None
    checkpoint: str | None = None


def _initialise(config: TrainConfig, data: _Data) -> _Start:
    transform = fit_transform(config.data, data.train)
    source_transform = None
    if data.source is not None:
        source_transform = fit_transform(config.source, data.source)
    state = init_train_state(config, data.shape, transform, source_transform)
    return _Start(state, 0, math.nan)


def _restore(run: RunDirectory, config: TrainConfig) -> _Start | None:
    """The newest checkpoint of `run`, checked against `config`; None when there is none. A
    newest checkpoint that cannot be read is an error naming it and the newest readable one."""
    latest = latest_checkpoint(run.checkpoints)
    if latest is None:
        return None
    loaded, skipped = newest_readable(run.checkpoints, _load_training_checkpoint)
    if skipped:
        newest, reason = skipped[0]
        if loaded is None:
            older = "no older checkpoint can be read either"
        else:
            found = checkpoint_path(run.checkpoints, loaded[0]["step"])
            older = f"move it out of {run.checkpoints!r} to resume from {found!r}"
        raise ValueError(f"cannot resume: the newest checkpoint {newest!r}: {reason}; {older}.")
    assert loaded is not None
    header, stored, state = loaded
    check_compatible(stored, config, f"checkpoint {latest!r}")
    dtype = jnp.result_type(float)
    if jnp.dtype(header["dtype"]) != dtype:
        raise ValueError(
            f"checkpoint {latest!r} was trained in {header['dtype']}, but this process "
            f"computes in {dtype}; resume in the same precision."
        )
    step = header["step"]
    if step > config.total_steps:
        raise ValueError(
            f"cannot resume {run.path!r} to step {config.total_steps}: its checkpoint is already "
            f"at step {step} (--steps {stored.steps}, --likelihood-steps "
            f"{stored.likelihood_steps}); give at least as many steps."
        )
    if step > stored.steps and config.steps != stored.steps:
        raise ValueError(
            f"cannot change --steps ({stored.steps} -> {config.steps}) of {run.path!r}: its "
            f"likelihood phase has begun (checkpoint at step {step})."
        )
    return _Start(
        state,
        step,
        float(header["loss"]),
        header["data_iterator"],
        header.get("source_iterator"),
        latest,
    )


def _plan(config: TrainConfig, data: _Data, end: int, run_dir: str) -> str:
    phase_plan = ""
    if config.likelihood_steps > 0:
        # Say so up front: the phase's steps cost far more than the first phase's.
        phase_plan = (
            f" ({config.steps} simulation-free, then {config.likelihood_steps} likelihood-phase "
            f"steps with the {config.likelihood_trace.value} trace; --likelihood-steps 0 skips "
            "them)"
        )
    return (
        f"training {config.model.forward.value} / {config.model.volatility.value} on "
        f"{config.data} ({data.train.shape[0]} examples of shape {data.shape}) to step {end}"
        f"{phase_plan} -> {run_dir}"
    )


def _interval_record(
    config: TrainConfig, step: int, terms: list, schedule, rate: float, seconds: float
) -> dict[str, Any]:
    """The metrics row of one logged interval (batch means over its steps)."""
    return {
        "step": step,
        "loss": float(np.mean([float(b.total) for b, _ in terms])),
        **{
            name: float(np.mean([float(getattr(b, name)) for b, _ in terms])) for name in LOSS_TERMS
        },
        "grad_norm": float(np.mean([float(g) for _, g in terms])),
        "lr": schedule(step - 1),
        "phase": "likelihood" if step > config.steps else "simulation-free",
        "steps_per_sec": rate,
        "seconds": seconds,
    }


LOSS_TERMS = ("diffusion", "prior", "reconstruction", "curvature")


def _diverged(config: TrainConfig, steps: list[int], totals: np.ndarray, last_good) -> Exception:
    bad = steps[int(np.argmin(np.isfinite(totals)))]
    return TrainingDiverged(
        f"training stopped: the loss became non-finite "
        f"({totals[~np.isfinite(totals)][0]}) at step {bad}; the last good checkpoint "
        + (f"is {last_good}" if last_good else "does not exist (none was saved yet)")
        + (
            "; in the likelihood phase, lower --likelihood-lr or loosen "
            "likelihood-tol (a solve that needs more than 1024 steps gives NaN)."
            if bad > config.steps
            else "; lower --lr or check the data."
        )
    )


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: TextIO | None = None,
    log: Callable[[str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
    """Train the model described by `config`, writing checkpoints and metrics to `run_dir`.

    - `resume`: continue from the latest checkpoint in `run_dir` (a fresh start if it has none).
      Without it, a non-empty `run_dir` is an error (nothing is overwritten). A checkpoint past
      the configured number of steps is an error, and so is a newest checkpoint that cannot be
      read (the message names the newest readable one).
    - `stop_at`: stop (after saving) at this step, before `config.steps`; the schedule still
      targets `config.steps`, so a later `resume` is exactly a run that never stopped.
    - `progress`: a stream for the progress bar (e.g. `sys.stderr`); `log`: for messages.
    - `mesh`: the devices to shard each batch over (default `data_mesh()`: every device of every
      process); `config.batch_size` must divide by their number. In a multi-process run every
      process calls `train` with the same arguments; only process 0 writes to `run_dir`.

    Nothing in `run_dir` changes before the first checkpoint of this call is saved (a fresh
    run writes its `config.json` first), and a failed save leaves the run as it was.
    `TrainResult.final_loss` is the loss of the last step taken, so a resumed run reports what
    a straight one does. Raises `TrainingDiverged` (a `ValueError`) if the loss becomes
    non-finite; the last good checkpoint is kept and no non-finite state is saved.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"`config` must be a TrainConfig; got {type(config).__name__}.")
    mesh = data_mesh() if mesh is None else mesh
    main = is_main_process()
    log = log if (log is not None and main) else (lambda message: None)
    run = RunDirectory(os.fspath(run_dir), main=main)
    config = _with_absolute_paths(config)
    check_run_directory(run.path, config, resume)
    check_model_config(config.model)
    rows = process_rows(config.batch_size, mesh)
    data = _load_data(config)  # validated before anything is written
    config = _resolve_for_data(config, data)
    start = _restore(run, config) if resume else None
    if start is None:
        start = _initialise(config, data)
    else:
        log(f"resuming {run.path} from step {start.step}")
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    log(_plan(config, data, end, run.path))
    # Every process has checked the run directory (and read a checkpoint) before any writes.
    barrier("nfdm_de.train.checked")
    run.open(config, step=start.step)
    return _loop(config, data, start, run, end, rows, mesh, progress if main else None, log)


def _loop(
    config: TrainConfig,
    data: _Data,
    start: _Start,
    run: RunDirectory,
    end: int,
    rows: slice,
    mesh: jax.sharding.Mesh,
    progress: TextIO | None,
    log: Callable[[str], None],
) -> TrainResult:
    """Steps `start.step` to `end`: log every `log_every` steps, save every `save_every`."""
    dtype = jnp.result_type(float)
    state = replicate(start.state, mesh)
    optimizer = make_optimizer(config.optim)
    schedule = run_schedule(config)
    streams = _batch_streams(config, data, start, rows)
    step_fn, likelihood_fn = _compiled_steps(config, data, state, optimizer)
    # This process's share of a likelihood-phase batch: the first rows of its share of a batch.
    likelihood_rows = None
    if config.likelihood_batch is not None and config.likelihood_steps > 0:
        share = process_rows(config.likelihood_batch, mesh)
        likelihood_rows = share.stop - share.start

    def header_for(loss_value: float) -> dict[str, Any]:
        return {
            "config": config.to_dict(),
            "data_shape": list(data.shape),
            "dtype": str(jnp.dtype(dtype)),
            "num_levels": data.num_levels,
            "data_iterator": streams[0].get_state(),
            "source_iterator": None if streams[1] is None else streams[1].get_state(),
            "loss": loss_value,
        }

    step, final_loss, checkpoint = start.step, start.loss, start.checkpoint
    bar = _Progress(config.total_steps, progress, start.step)
    pending: list[tuple[int, LossBreakdown, Array]] = []
    final_terms: dict[str, float] = {}
    started = interval_start = time.perf_counter()
    interval_steps = 0
    try:
        while step < end:
            host_batch = np.asarray(next(streams[0]), dtype)
            if step >= config.steps and likelihood_rows is not None:
                host_batch = host_batch[:likelihood_rows]
            batch = shard_batch(host_batch, mesh)
            # Host scalars: replicated constants of the step on every device and process.
            lr = np.asarray(schedule(step), dtype)
            if step < config.steps:
                source_batch = None
                if streams[1] is not None:
                    source_batch = shard_batch(np.asarray(next(streams[1]), dtype), mesh)
                state, breakdown, grad_norm = step_fn(
                    state, batch, np.asarray(step), lr, source_batch=source_batch
                )
            else:
                if step == config.steps:
                    # The likelihood phase starts with a fresh Adam state: the moments of the
                    # simulation-free loss's gradients have another scale.
                    log(f"likelihood phase: {config.likelihood_steps} steps of ODE max. likelihood")
                    opt_state = optimizer.init(_params(state.model))
                    state = replicate(eqx.tree_at(lambda s: s.opt_state, state, opt_state), mesh)
                state, breakdown, grad_norm = likelihood_fn(
                    state, batch, np.asarray(step), lr, ema_step=np.asarray(step - config.steps)
                )
            step += 1
            interval_steps += 1
            pending.append((step, breakdown, grad_norm))
            # A row at the phase boundary too, so no logged interval mixes the two objectives.
            log_now = step % config.log_every == 0 or step == config.steps
            save_now = step % config.save_every == 0 or step == end
            if not (log_now or save_now):
                # Keep the bar moving without forcing a device sync on every step; except in the
                # likelihood phase, whose steps are ~100x slower (a sync is nothing there, and a
                # bar updated only every `log_every` steps would sit still for minutes).
                if step > config.steps and bar.stream is not None:
                    elapsed = max(time.perf_counter() - interval_start, 1e-9)
                    loss_now = float(jax.device_get(breakdown.total))
                    bar.update(step, loss_now, interval_steps / elapsed)
                continue
            terms = jax.device_get([(b, g) for _, b, g in pending])
            totals = np.array([float(b.total) for b, _ in terms])
            if not np.all(np.isfinite(totals)):
                steps_done = [s for s, _, _ in pending]
                raise _diverged(config, steps_done, totals, latest_checkpoint(run.checkpoints))
            now = time.perf_counter()
            rate = interval_steps / max(now - interval_start, 1e-9)
            record = _interval_record(config, step, terms, schedule, rate, now - started)
            final_loss = float(totals[-1])
            final_terms = {name: float(getattr(terms[-1][0], name)) for name in LOSS_TERMS}
            run.log(record)
            pending.clear()
            interval_start, interval_steps = now, 0
            curvature = record["curvature"] if config.model.curvature > 0 else None
            bar.update(step, record["loss"], rate, force=step == end, curvature=curvature)
            if save_now:
                if not _tree_is_finite(state):
                    raise TrainingDiverged(
                        f"training stopped: the parameters became non-finite by step {step}; "
                        f"the last good checkpoint is {latest_checkpoint(run.checkpoints)}."
                    )
                checkpoint = run.save(step, state, header_for(final_loss), config)
    finally:
        bar.close()
    return TrainResult(
        run_dir=run.path,
        steps=step,
        final_loss=final_loss,
        seconds=time.perf_counter() - started,
        resumed_from=start.step,
        checkpoint=checkpoint,
        devices=mesh_size(mesh),
        processes=jax.process_count(),
        final_terms=final_terms,
    )


def _batch_streams(
    config: TrainConfig, data: _Data, start: _Start, rows: slice
) -> tuple[BatchStream, BatchStream | None]:
    """The batch stream of the data (this process's `rows` of each batch) and of a bridge's
    source, at the positions `start` recorded."""
    stream = BatchStream(data.train, batch_size=config.batch_size, seed=config.seed, rows=rows)
    if start.iterator_state is not None:
        stream.set_state(start.iterator_state)
    source = None
    if data.source is not None:
        source = BatchStream(data.source, batch_size=config.batch_size, seed=config.seed + 1)
        if start.source_iterator_state is not None:
            source.set_state(start.source_iterator_state)
    return stream, source


def _compiled_steps(
    config: TrainConfig, data: _Data, state: TrainState, optimizer
) -> tuple[CompiledTrainStep, CompiledTrainStep]:
    """The simulation-free step and the likelihood-phase step, each compiled (lazily, on its
    first call) for this state's layout, so a call skips filter_jit's per-step partitioning."""
    options = dict(
        curvature_weight=float(config.model.curvature),
        ema_decay=float(config.optim.ema_decay),
        num_levels=data.num_levels,
        time_power=float(config.model.time_power),
    )
    trace = Hutchinson() if config.likelihood_trace is TraceChoice.HUTCHINSON else ExactTrace()
    likelihood = LikelihoodSolve(tol=config.likelihood_tol, trace=trace)
    return (
        CompiledTrainStep(state, optimizer, **options),
        CompiledTrainStep(
            state,
            optimizer,
            **options,
            likelihood=likelihood,
            bound_weight=float(config.likelihood_bound_weight),
        ),
    )
