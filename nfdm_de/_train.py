"""Training: optimiser, EMA, the jitted train step, the loop, run directories and `load_run`.

A run directory holds

    config.json        the resolved `TrainConfig` (JSON)
    metrics.jsonl      one JSON object per logged interval (loss terms, lr, grad norm, steps/s)
    checkpoints/       step_XXXXXXXX.eqx, the last `keep` of them (see `_checkpoint`)

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
import json
import math
import os
import sys
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
from ._checkpoint import (
    atomic_write_bytes,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    read_header,
    save_checkpoint,
)
from ._config import (
    OptimConfig,
    ScheduleChoice,
    TraceChoice,
    TrainConfig,
    build_model,
    check_model_config,
    config_differences,
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

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"


class TrainingDiverged(ValueError):
    """The loss became non-finite; the last good checkpoint is kept."""


# --- optimiser and state ------------------------------------------------------------------------


def learning_rate_schedule(config: OptimConfig, steps: int) -> Callable[[int], float]:
    """step -> learning rate: linear warm-up from 0 to `lr` over `warmup` steps, then a cosine
    decay reaching `final_lr_fraction * lr` at `steps` (or a constant rate).

    Computed on the host in plain Python and fed to the jitted step as a number, so the compiled
    step does not depend on the run length (resuming with more steps does not recompile).
    """
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
        optax.scale_by_adam(),
        optax.add_decayed_weights(weight_decay),
    ]
    # Only when asked: an extra link would change the optimiser state's structure, and with it
    # every checkpoint saved before the option existed.
    if forward_network_lr_scale != 1.0:
        parts.append(_scale_forward_network(forward_network_lr_scale))
    return optax.chain(*parts)


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
    decay = jnp.minimum(ema_decay, (1.0 + ema_step) / (10.0 + ema_step))
    ema_params, ema_static = eqx.partition(state.ema_model, eqx.is_inexact_array)
    ema_params = jax.tree.map(
        lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema_params, params
    )
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


def load_run(run_dir: str) -> LoadedRun:
    """Load the latest checkpoint of the run in `run_dir` (EMA weights as `.model`)."""
    run_dir = os.fspath(run_dir)
    path = latest_checkpoint(os.path.join(run_dir, CHECKPOINT_DIR))
    if path is None:
        raise ValueError(
            f"{run_dir!r} holds no nfdm-de checkpoint (expected {CHECKPOINT_DIR}/step_*.eqx); "
            "train one with `nfdm-de train --run-dir ...`."
        )
    header = read_header(path)
    config = TrainConfig.from_dict(header["config"])
    _, state = load_checkpoint(path, _state_skeleton(config, header))
    dtype = jnp.result_type(float)
    return LoadedRun(
        model=_cast_floats(state.ema_model, dtype),
        config=config,
        transform=_cast_floats(state.transform, dtype),
        dataset=config.data,
        num_levels=header.get("num_levels"),
        step=int(header["step"]),
        path=path,
        raw_model=_cast_floats(state.model, dtype),
        source_transform=_cast_floats(state.source_transform, dtype),
    )


def read_run_config(run_dir: str) -> TrainConfig | None:
    """The resolved config stored in `run_dir`, or None when there is none."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return TrainConfig.from_dict(json.load(f))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the run config {path!r}: {error}") from None


def _check_run_directory(run_dir: str, config: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite anything: a non-empty directory needs `resume`, and then must hold a
    run whose config matches in every non-resumable field."""
    if not os.path.exists(run_dir):
        return
    if not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} exists and is not a directory.")
    if not os.listdir(run_dir):
        return
    stored = read_run_config(run_dir)
    if not resume:
        what = "a run" if stored is not None else "other files"
        raise ValueError(
            f"run directory {run_dir!r} already holds {what}; pass --resume to continue it or "
            "choose a new --run-dir."
        )
    if stored is None:
        raise ValueError(
            f"cannot resume: {run_dir!r} is not empty and holds no nfdm-de run ({CONFIG_FILE})."
        )
    _check_compatible(stored, config, f"the run in {run_dir!r}")


def _check_compatible(stored: TrainConfig, given: TrainConfig, what: str) -> None:
    differences = [
        d
        for d in config_differences(stored, given)
        if d.split(":")[0] not in TrainConfig.RESUMABLE_FIELDS
    ]
    if differences:
        raise ValueError(
            f"cannot resume {what} with a different configuration: " + "; ".join(differences)
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


def _truncate_metrics(path: str, step: int) -> None:
    """Drop metrics of work lost after the checkpoint we resume from (atomic rewrite)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed process
    atomic_write_bytes(path, "".join(kept).encode())


def train(
    config: TrainConfig,
    run_dir: str,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    progress: TextIO | None = None,
    log: Callable[[str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
    """Train the model described by `config`, writing checkpoints and metrics to `run_dir`.

    - `resume`: continue from the latest checkpoint in `run_dir` (a fresh start if it has none).
      Without it, a non-empty `run_dir` is an error (nothing is overwritten).
    - `stop_at`: stop (after saving) at this step, before `config.steps`; the schedule still
      targets `config.steps`, so a later `resume` is exactly a run that never stopped.
    - `progress`: a stream for the progress bar (e.g. `sys.stderr`); `log`: for messages.
    - `mesh`: the devices to shard each batch over (default `data_mesh()`: every device of every
      process); `config.batch_size` must divide by their number. In a multi-process run every
      process calls `train` with the same arguments; only process 0 writes to `run_dir`.

    Raises `TrainingDiverged` (a `ValueError`) if the loss becomes non-finite; the last good
    checkpoint is kept and no non-finite state is saved.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"`config` must be a TrainConfig; got {type(config).__name__}.")
    mesh = data_mesh() if mesh is None else mesh
    main = is_main_process()
    log = log if (log is not None and main) else (lambda message: None)
    progress = progress if main else None
    run_dir = os.fspath(run_dir)
    if is_file_reference(config.data):
        config = dataclasses.replace(config, data=os.path.abspath(config.data))
    if config.source is not None and is_file_reference(config.source):
        config = dataclasses.replace(config, source=os.path.abspath(config.source))
    _check_run_directory(run_dir, config, resume)
    check_model_config(config.model)
    rows = process_rows(config.batch_size, mesh)

    # Validate the data before creating anything on disk.
    finite = is_file_reference(config.data) or config.data in ("digits", *IMAGE_DATASETS)
    num = None if finite else config.num_train
    data = load_dataset(config.data, split="train", num=num, seed=config.seed)
    num_levels = dataset_num_levels(config.data)
    data_shape = data.shape[1:]
    dtype = jnp.result_type(float)
    source_data = None
    if config.source is not None:
        source_num = None if is_file_reference(config.source) else config.num_train
        # The source's own random stream (seed + 1), independent of the target's.
        source_data = load_dataset(
            config.source, split="train", num=source_num, seed=config.seed + 1
        )
        if source_data.shape[1:] != data_shape:
            raise ValueError(
                f"the source {config.source!r} has examples of shape {source_data.shape[1:]} but "
                f"the target {config.data!r} has {data_shape}; a bridge needs one dimension."
            )
        if num_levels is not None or dataset_num_levels(config.source) is not None:
            raise ValueError("bridges support continuous data only (no integer-valued sets).")
    config = resolve_likelihood_phase(config, data_shape, discrete=num_levels is not None)
    if config.likelihood_steps > 0 and (config.source is not None or len(data_shape) != 1):
        raise ValueError(
            "the likelihood phase (likelihood_steps > 0) needs an NFDM on vector data: its exact "
            f"trace costs D network evaluations per ODE step; got data of shape {data_shape}"
            + (" and a bridge (--source)." if config.source is not None else ".")
        )

    # This process's share of a likelihood-phase batch: the first rows of its share of a batch.
    likelihood_rows = None
    if config.likelihood_batch is not None and config.likelihood_steps > 0:
        share = process_rows(config.likelihood_batch, mesh)
        likelihood_rows = share.stop - share.start
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)

    checkpoint_dir = os.path.join(run_dir, CHECKPOINT_DIR)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    latest = latest_checkpoint(checkpoint_dir) if resume else None
    if latest is not None:
        header = read_header(latest)
        _check_compatible(TrainConfig.from_dict(header["config"]), config, f"checkpoint {latest!r}")
        if jnp.dtype(header.get("dtype")) != dtype:
            raise ValueError(
                f"checkpoint {latest!r} was trained in {header.get('dtype')}, but this process "
                f"computes in {dtype}; resume in the same precision."
            )
        _, state = load_checkpoint(latest, _state_skeleton(config, header))
        step = int(header["step"])
        stored_steps = int(header["config"]["steps"])
        if step > stored_steps and config.steps != stored_steps:
            raise ValueError(
                f"cannot change --steps ({stored_steps} -> {config.steps}) of {run_dir!r}: its "
                f"likelihood phase has begun (checkpoint at step {step})."
            )
        final_loss = float(header.get("loss", math.nan))
        iterator_state = header["data_iterator"]
        source_iterator_state = header.get("source_iterator")
        if main:
            _truncate_metrics(metrics_path, step)
        log(f"resuming {run_dir} from step {step}")
    else:
        transform = fit_transform(config.data, data)
        source_transform = None
        if source_data is not None:
            source_transform = fit_transform(config.source, source_data)
        state = init_train_state(config, data_shape, transform, source_transform)
        step = 0
        final_loss = math.nan
        iterator_state = source_iterator_state = None
        if resume and main:  # a run killed before its first checkpoint: forget its metrics
            _truncate_metrics(metrics_path, 0)
    phase_plan = ""
    if config.likelihood_steps > 0:
        # Say so up front: the phase's steps cost far more than the first phase's.
        phase_plan = (
            f" ({config.steps} simulation-free, then {config.likelihood_steps} likelihood-phase "
            f"steps with the {config.likelihood_trace.value} trace; --likelihood-steps 0 skips "
            "them)"
        )
    log(
        f"training {config.model.forward.value} / {config.model.volatility.value} on "
        f"{config.data} ({data.shape[0]} examples of shape {data_shape}) to step {end}"
        f"{phase_plan} -> {run_dir}"
    )
    # Every process has checked the run directory (and read a checkpoint) before any writes.
    barrier("nfdm_de.train.checked")
    if main:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_bytes(
            os.path.join(run_dir, CONFIG_FILE), json.dumps(config.to_dict(), indent=2).encode()
        )
    state = replicate(state, mesh)

    optimizer = make_optimizer(config.optim)
    schedule = run_schedule(config)
    iterator = BatchStream(data, batch_size=config.batch_size, seed=config.seed, rows=rows)
    if iterator_state is not None:
        iterator.set_state(iterator_state)
    source_iterator = None
    if source_data is not None:
        source_iterator = BatchStream(
            source_data, batch_size=config.batch_size, seed=config.seed + 1
        )
        if source_iterator_state is not None:
            source_iterator.set_state(source_iterator_state)
    step_options = dict(
        curvature_weight=float(config.model.curvature),
        ema_decay=float(config.optim.ema_decay),
        num_levels=num_levels,
        time_power=float(config.model.time_power),
    )
    # Compiled for this state's layout once: a call skips filter_jit's per-step partitioning.
    step_fn = CompiledTrainStep(state, optimizer, **step_options)
    trace = Hutchinson() if config.likelihood_trace is TraceChoice.HUTCHINSON else ExactTrace()
    likelihood_fn = CompiledTrainStep(
        state,
        optimizer,
        **step_options,
        likelihood=LikelihoodSolve(tol=config.likelihood_tol, trace=trace),
        bound_weight=float(config.likelihood_bound_weight),
    )

    def header_for(step: int, loss_value: float) -> dict[str, Any]:
        return {
            "config": config.to_dict(),
            "data_shape": list(data_shape),
            "dtype": str(jnp.dtype(dtype)),
            "num_levels": num_levels,
            "data_iterator": iterator.get_state(),
            "source_iterator": None if source_iterator is None else source_iterator.get_state(),
            "loss": loss_value,
        }

    start_step = step
    bar = _Progress(config.total_steps, progress, start_step)
    pending: list[tuple[int, LossBreakdown, Array]] = []
    final_terms: dict[str, float] = {}
    show_curvature = config.model.curvature > 0
    checkpoint = latest
    started = interval_start = time.perf_counter()
    interval_steps = 0
    try:
        while step < end:
            host_batch = np.asarray(next(iterator), dtype)
            if step >= config.steps and likelihood_rows is not None:
                host_batch = host_batch[:likelihood_rows]
            batch = shard_batch(host_batch, mesh)
            # Host scalars: replicated constants of the step on every device and process.
            lr = np.asarray(schedule(step), dtype)
            source_batch = None
            if source_iterator is not None:
                source_batch = shard_batch(np.asarray(next(source_iterator), dtype), mesh)
            if step < config.steps:
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
                bad = pending[int(np.argmin(np.isfinite(totals)))][0]
                last_good = latest_checkpoint(checkpoint_dir)
                raise TrainingDiverged(
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
            now = time.perf_counter()
            rate = interval_steps / max(now - interval_start, 1e-9)
            final_loss = float(totals.mean())
            record = {
                "step": step,
                "loss": final_loss,
                **{
                    name: float(np.mean([float(getattr(b, name)) for b, _ in terms]))
                    for name in ("diffusion", "prior", "reconstruction", "curvature")
                },
                "grad_norm": float(np.mean([float(g) for _, g in terms])),
                "lr": schedule(step - 1),
                "phase": "likelihood" if step > config.steps else "simulation-free",
                "steps_per_sec": rate,
                "seconds": now - started,
            }
            final_terms = {
                name: record[name] for name in ("diffusion", "prior", "reconstruction", "curvature")
            }
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            pending.clear()
            interval_start, interval_steps = now, 0
            bar.update(
                step,
                final_loss,
                rate,
                force=step == end,
                curvature=record["curvature"] if show_curvature else None,
            )
            if save_now:
                if not _tree_is_finite(state):
                    raise TrainingDiverged(
                        f"training stopped: the parameters became non-finite by step {step}; "
                        f"the last good checkpoint is {latest_checkpoint(checkpoint_dir)}."
                    )
                if main:
                    checkpoint = save_checkpoint(
                        checkpoint_dir, step, state, header_for(step, final_loss), keep=config.keep
                    )
                else:
                    checkpoint = checkpoint_path(checkpoint_dir, step)  # written by process 0
    finally:
        bar.close()
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        final_loss=final_loss,
        seconds=time.perf_counter() - started,
        resumed_from=start_step,
        checkpoint=checkpoint,
        devices=mesh_size(mesh),
        processes=jax.process_count(),
        final_terms=final_terms,
    )


def _stderr_log(message: str) -> None:
    sys.stderr.write(message + "\n")
