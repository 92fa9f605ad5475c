"""`train`: the loop over steps, with interval logging, checkpoints and the progress bar.

The run directory (config, metrics, checkpoints) is a `RunDirectory` (`_run_dir.py`).

Exact resume: the randomness of step s is `fold_in(key, s)` and batch s is a pure function of
(data, seed, s) (a grain `MapDataset`), so a run resumed from a checkpoint at step s computes
bit-identical parameters to a run that never stopped.

Data parallelism (see `_sharding`): the batch of every step is sharded over all devices of all
processes and the state is replicated; each process reads only its rows of each batch, and only
process 0 writes the run directory. The global batch is the same as on one device, so is the
loss trajectory (to float rounding of the cross-device sums).
"""

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._checkpoint import latest_checkpoint
from .._data._stream import (
    BatchStream,
)
from .._loss import LossBreakdown
from .._ml import LikelihoodSolve
from .._model import NFDM
from .._sharding import (
    barrier,
    data_mesh,
    is_main_process,
    mesh_size,
    process_rows,
    replicate,
    shard_batch,
)
from .._terms import ExactTrace, Hutchinson
from ._build import check_model_config
from ._config import TraceChoice, TrainConfig
from ._optimizer import make_optimizer, run_schedule
from ._prepare import (
    _Data,
    _initialise,
    _load_data,
    _resolve_for_data,
    _restore,
    _Start,
    _with_absolute_paths,
)
from ._progress import ProgressReport, ProgressSink, StreamProgress, TextStream
from ._run_dir import (
    RunDirectory,
    check_run_directory,
)
from ._state import TrainState, _params, check_user_model
from ._step import CompiledTrainStep


class TrainingDiverged(ValueError):
    """The loss became non-finite; the last good checkpoint is kept."""


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


def _display(progress: TextStream | ProgressSink | None) -> ProgressSink | None:
    if progress is None or isinstance(progress, ProgressSink):
        return progress
    return StreamProgress(progress)


def _report(
    config: TrainConfig,
    step: int,
    loss: float,
    terms: dict[str, float],
    rate: float,
    phase_end: int,
    *,
    final: bool = False,
) -> ProgressReport:
    seconds_left = (phase_end - step) / rate if rate > 0 else None
    phase = "likelihood" if step > config.steps else "simulation-free"
    return ProgressReport(
        step, config.total_steps, phase, loss, terms, rate, seconds_left, phase_end, final
    )


def _steps_per_second(step: int, since_step: int, since: float, now: float) -> float:
    """The rate since step `since_step` ended at time `since` (0 before a step has passed)."""
    return (step - since_step) / max(now - since, 1e-9) if step > since_step else 0.0


def _tree_is_finite(tree) -> bool:
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    # numpy on the host: no per-shape compilation of a tiny reduction.
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in leaves)


def _plan(
    config: TrainConfig, data: _Data, end: int, run_dir: str, *, user_model: bool = False
) -> str:
    phase_plan = ""
    if config.resolved_likelihood_steps > 0:
        # Say so up front: the phase's steps cost far more than the first phase's.
        phase_plan = (
            f" ({config.steps} simulation-free, then {config.likelihood_steps} likelihood-phase "
            f"steps with the {config.likelihood_trace.value} trace; --likelihood-steps 0 skips "
            "them)"
        )
    what = (
        "a user-built NFDM"
        if user_model
        else f"{config.model.forward.value} / {config.model.volatility.value}"
    )
    return (
        f"training {what} on "
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
    progress: TextStream | ProgressSink | None = None,
    log: Callable[[str], None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    model: NFDM | None = None,
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
    - `model`: a user-built `NFDM` to train instead of the one `config.model` describes (your
      own predictor, forward process or volatility), with everything else of `config`:
      checkpoints, exact resume, EMA and the likelihood phase. The run is marked as holding a
      user-built model: `load_run(run_dir, like=model)` loads it and resuming needs `model`
      again (a model of the same structure; its values are replaced by the checkpoint's).

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
    if model is not None:
        check_user_model(model, config, data.shape)
    start = _restore(run, config, like=model) if resume else None
    if start is None:
        start = _initialise(config, data, model)
    else:
        log(f"resuming {run.path} from step {start.step}")
    end = config.total_steps if stop_at is None else min(stop_at, config.total_steps)
    log(_plan(config, data, end, run.path, user_model=model is not None))
    if start.step < end:
        log("compiling the training step (the first step waits for it)")
    # Every process has checked the run directory (and read a checkpoint) before any writes.
    barrier("nfdm_de.train.checked")
    run.open(config, step=start.step)
    stepper = _Stepper(config, data, start, rows, mesh, log, user_model=model is not None)
    return _loop(config, stepper, start, run, end, progress if main else None)


class _Stepper:
    """One optimiser step of a run at a time: the step's batch (this process's rows), its
    learning rate, and the simulation-free or the likelihood-phase step."""

    def __init__(
        self,
        config: TrainConfig,
        data: _Data,
        start: _Start,
        rows: slice,
        mesh,
        log,
        *,
        user_model: bool = False,
    ):
        self.config, self.data, self.mesh, self.log = config, data, mesh, log
        self.user_model = user_model
        self.dtype = jnp.result_type(float)
        self.optimizer = make_optimizer(config.optim)
        self.schedule = run_schedule(config)
        self.streams = _batch_streams(config, data, start, rows)
        self.state = replicate(start.state, mesh)
        self.step_fn, self.likelihood_fn = _compiled_steps(config, data, self.state, self.optimizer)
        # This process's share of a likelihood-phase batch: the first rows of its batch share.
        self.likelihood_rows = None
        if config.likelihood_batch is not None and config.resolved_likelihood_steps > 0:
            share = process_rows(config.likelihood_batch, mesh)
            self.likelihood_rows = share.stop - share.start

    def __call__(self, step: int) -> tuple[LossBreakdown, Array]:
        """Take step `step` (0-based); the new state is `self.state`."""
        config, mesh = self.config, self.mesh
        host_batch, host_labels = _split_labels(next(self.streams[0]))
        host_batch = np.asarray(host_batch, self.dtype)
        if step >= config.steps and self.likelihood_rows is not None:
            host_batch = host_batch[: self.likelihood_rows]
            if host_labels is not None:
                host_labels = host_labels[: self.likelihood_rows]
        batch = shard_batch(host_batch, mesh)
        labels = None if host_labels is None else shard_batch(host_labels, mesh)
        # Host scalars: replicated constants of the step on every device and process.
        lr = np.asarray(self.schedule(step), self.dtype)
        if step < config.steps:
            source_batch = None
            if self.streams[1] is not None:
                source_batch = shard_batch(np.asarray(next(self.streams[1]), self.dtype), mesh)
            self.state, breakdown, grad_norm = self.step_fn(
                self.state, batch, np.asarray(step), lr, source_batch=source_batch, labels=labels
            )
            return breakdown, grad_norm
        if step == config.steps:
            # The likelihood phase starts with a fresh Adam state: the moments of the
            # simulation-free loss's gradients have another scale.
            self.log(f"likelihood phase: {config.likelihood_steps} steps of ODE max. likelihood")
            opt_state = self.optimizer.init(_params(self.state.model))
            self.state = replicate(eqx.tree_at(lambda s: s.opt_state, self.state, opt_state), mesh)
        self.state, breakdown, grad_norm = self.likelihood_fn(
            self.state,
            batch,
            np.asarray(step),
            lr,
            ema_step=np.asarray(step - config.steps),
            labels=labels,
        )
        return breakdown, grad_norm

    def header(self, loss_value: float) -> dict[str, Any]:
        """The JSON header of a checkpoint of the current state."""
        streams = self.streams
        return {
            "config": self.config.to_dict(),
            "data_shape": list(self.data.shape),
            "dtype": str(jnp.dtype(self.dtype)),
            "num_levels": self.data.num_levels,
            "data_iterator": streams[0].get_state(),
            "source_iterator": None if streams[1] is None else streams[1].get_state(),
            "loss": loss_value,
            "user_model": self.user_model,
        }


def _loop(
    config: TrainConfig,
    stepper: _Stepper,
    start: _Start,
    run: RunDirectory,
    end: int,
    progress: TextStream | ProgressSink | None,
) -> TrainResult:
    """Steps `start.step` to `end`: log every `log_every` steps, save every `save_every`."""
    step, final_loss, checkpoint = start.step, start.loss, start.checkpoint
    bar = _display(progress)
    pending: list[tuple[int, LossBreakdown, Array]] = []
    final_terms: dict[str, float] = {}
    started = interval_start = time.perf_counter()
    # The bar's rate counts from the end of each phase's first step, which waits for the
    # compilation of that phase's step.
    compiled_at, compiled_step = started, step
    try:
        while step < end:
            breakdown, grad_norm = stepper(step)
            step += 1
            pending.append((step, breakdown, grad_norm))
            if step in (start.step + 1, config.steps + 1):
                jax.block_until_ready(breakdown.total)
                compiled_at, compiled_step = time.perf_counter(), step
                what = "likelihood-phase step" if step > config.steps else "training step"
                stepper.log(
                    f"compiled the {what}; step {step} done in {compiled_at - started:.1f} s"
                )

            phase_end = config.steps if step <= config.steps else config.total_steps
            # A row at the phase boundary too, so no logged interval mixes the two objectives.
            log_now = step % config.log_every == 0 or step == config.steps
            save_now = step % config.save_every == 0 or step == end
            if not (log_now or save_now):
                # The likelihood phase's steps are ~100x slower: a device sync per step costs
                # nothing there, and the bar would otherwise sit still for minutes.
                if step > config.steps and bar is not None:
                    rate = _steps_per_second(step, compiled_step, compiled_at, time.perf_counter())
                    loss_now = float(jax.device_get(breakdown.total))
                    report = _report(config, step, loss_now, {}, rate, min(phase_end, end))
                    bar.update(report)
                continue
            terms = jax.device_get([(b, g) for _, b, g in pending])
            totals = np.array([float(b.total) for b, _ in terms])
            if not np.all(np.isfinite(totals)):
                steps_done = [s for s, _, _ in pending]
                raise _diverged(config, steps_done, totals, latest_checkpoint(run.checkpoints))
            now = time.perf_counter()
            rate = len(pending) / max(now - interval_start, 1e-9)
            record = _interval_record(config, step, terms, stepper.schedule, rate, now - started)
            final_loss = float(totals[-1])
            final_terms = {name: float(getattr(terms[-1][0], name)) for name in LOSS_TERMS}
            run.log(record)
            pending.clear()
            interval_start = now
            if bar is not None:
                shown = ("diffusion", "reconstruction")
                shown += ("curvature",) if config.model.curvature > 0 else ()
                rate = _steps_per_second(step, compiled_step, compiled_at, now) or rate
                report = _report(
                    config,
                    step,
                    record["loss"],
                    {name: record[name] for name in shown},
                    rate,
                    min(phase_end, end),
                    final=step == end,
                )
                bar.update(report)
            if save_now:
                if not _tree_is_finite(stepper.state):
                    raise TrainingDiverged(
                        f"training stopped: the parameters became non-finite by step {step}; "
                        f"the last good checkpoint is {latest_checkpoint(run.checkpoints)}."
                    )
                checkpoint = run.save(step, stepper.state, stepper.header(final_loss), config)
    finally:
        if bar is not None:
            bar.close()
    return TrainResult(
        run_dir=run.path,
        steps=step,
        final_loss=final_loss,
        seconds=time.perf_counter() - started,
        resumed_from=start.step,
        checkpoint=checkpoint,
        devices=mesh_size(stepper.mesh),
        processes=jax.process_count(),
        final_terms=final_terms,
    )


def _split_labels(batch) -> tuple[np.ndarray, np.ndarray | None]:
    """A stream's batch as (rows, labels or None)."""
    if isinstance(batch, tuple):
        return batch[0], batch[1]
    return batch, None


def _batch_streams(
    config: TrainConfig, data: _Data, start: _Start, rows: slice
) -> tuple[BatchStream, BatchStream | None]:
    """The batch stream of the data (this process's `rows` of each batch) and of a bridge's
    source, at the positions `start` recorded."""
    stream = BatchStream(
        data.train, batch_size=config.batch_size, seed=config.seed, rows=rows, labels=data.labels
    )
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
    options: dict[str, Any] = dict(
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
