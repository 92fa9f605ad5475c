"""Held-out NLL of a trained run in the data's own units: what `nfdm-de nll` computes.

The model-space log-density is corrected by the run's data transform (its log-Jacobian), and
integer data are dequantized with the D log(scale) - D log K offset (docs/math.md, "Bits/dim"),
which gives a bound on the discrete NLL. Examples are streamed in batches of one
compiled shape: a short last batch is padded with repeats of its own rows, which leaves an
adaptive solve's error norm (a max over examples) unchanged, and the extra rows are dropped.
"""

import dataclasses
import enum
import math
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ._custom_types import Key
from ._likelihood import Dequantization, log_likelihood, variational_bound
from ._model import NFDM
from ._sharding import data_mesh, resolve_chunks
from ._solve import ErrorNorm, SolveStats, check_solve_settings
from ._terms import AbstractTraceEstimator, ExactTrace, Hutchinson
from ._train._load import LoadedRun

# The exact divergence costs D Jacobian-vector products per evaluation and adds no noise; above
# this dimension (images) Hutchinson's one-probe estimate is the default for evaluation.
EVALUATION_EXACT_TRACE_MAX_DIM = 64
# t = u^3 puts the bound's Monte Carlo times where its integrand lives (small t): the same bound
# with about half the standard error.
BOUND_TIME_POWER = 3.0


class NLLMethod(enum.Enum):
    """How the NLL is computed: through the probability-flow ODE, or the variational bound."""

    ODE = "ode"
    BOUND = "bound"


def default_evaluation_trace(dims: int, num_probes: int = 1) -> AbstractTraceEstimator:
    """The divergence estimator for evaluating data of `dims` dimensions: exact up to
    `EVALUATION_EXACT_TRACE_MAX_DIM`, Hutchinson above."""
    if dims <= EVALUATION_EXACT_TRACE_MAX_DIM:
        return ExactTrace()
    return Hutchinson(num_probes=num_probes)


def default_nll_method(run: LoadedRun) -> NLLMethod:
    """What the run's model optimises: the ODE NLL for a deterministic model (g = 0) or after a
    likelihood phase, else the variational bound."""
    model = run.model
    phase_done = (run.config.likelihood_steps or 0) > 0 and run.step > run.config.steps
    return NLLMethod.ODE if model.is_deterministic or phase_done else NLLMethod.BOUND


@dataclasses.dataclass(frozen=True)
class NLLResult:
    """Per-example NLL (nats, data units) of one method, and the cost of computing it."""

    method: NLLMethod
    values: np.ndarray
    stats: SolveStats

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def stderr(self) -> float | None:
        """Standard error of the mean over examples (it includes each estimator's own Monte
        Carlo noise); None for a single example."""
        n = len(self.values)
        return float(np.std(self.values, ddof=1) / math.sqrt(n)) if n > 1 else None

    def bits_per_dim(self, dims: int) -> float:
        return self.mean / (dims * math.log(2))


def check_examples(run: LoadedRun, x: np.ndarray, where: str) -> np.ndarray:
    """`x` as examples of the run's data shape (vectors flattened), checked: the right size, and
    integers in [0, K) for a run on integer data."""
    shape = tuple(run.model.data_shape)
    x = np.asarray(x)
    if len(shape) == 1:
        x = x.reshape(x.shape[0], -1)
        if x.shape[1:] != shape:
            raise ValueError(
                f"{where} have {x.shape[1]} dimensions per example; the model was trained on "
                f"{math.prod(shape)}."
            )
    elif x.shape[1:] != shape:
        raise ValueError(
            f"{where} have examples of shape {x.shape[1:]}; the model was trained on images of "
            f"shape {shape}."
        )
    if run.num_levels is not None:
        levels = int(run.num_levels)
        low, high = float(x.min()), float(x.max())
        if not np.all(x == np.rint(x)) or low < 0 or high >= levels:
            raise ValueError(
                f"{where} must be integers in [0, {levels}) for this run (num_levels={levels}); "
                f"got values in [{low:g}, {high:g}]."
            )
    return x


def check_labels(run: LoadedRun, labels: np.ndarray | None, num: int) -> np.ndarray | None:
    """The class of each of `num` examples for a class-conditional run (None otherwise), as
    int32, or the ValueError that says what is missing or wrong."""
    classes = run.config.model.num_classes
    if classes is None:
        if labels is not None:
            raise ValueError("the data has class labels, but this run's model is unconditional.")
        return None
    if labels is None:
        raise ValueError(
            f"this run's model is class-conditional ({classes} classes): give data with labels "
            "(a .npz with a 'labels' array)."
        )
    labels = np.asarray(labels)
    if labels.shape != (num,):
        raise ValueError(f"expected one label per example ({num}); got shape {labels.shape}.")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"labels must be in [0, {classes}); got values in [{labels.min()}, {labels.max()}]."
        )
    return labels.astype(np.int32)


def _dequantization(run: LoadedRun) -> Dequantization | None:
    """The run's data transform as a dequantizer: s = (y - shift) / scale, y = (x + u) / K."""
    if run.num_levels is None:
        return None
    scale = 1.0 / run.transform.scale
    return Dequantization(
        num_levels=int(run.num_levels), scale=scale, shift=-run.transform.shift * scale
    )


def _nfdm_model(run: LoadedRun) -> NFDM:
    """The run's model, which the NLL is defined for only when it is an NFDM (not a bridge)."""
    if not isinstance(run.model, NFDM):
        raise ValueError(
            f"the NLL is defined for NFDMs (class-conditional ones too), not bridges; this run "
            f"holds a {type(run.model).__name__}."
        )
    return run.model


def check_evaluation(
    run: LoadedRun,
    methods: tuple[NLLMethod, ...],
    *,
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int = 4096,
    batch_size: int = 1000,
    num_chunks: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX,
) -> tuple[int, jax.sharding.Mesh]:
    """The ValueError `evaluate_nll` would raise for these settings, before any work; else the
    number of chunks per batch and the mesh it would use."""
    if not methods:
        raise ValueError("`methods` must name at least one NLLMethod.")
    _nfdm_model(run)
    if NLLMethod.BOUND in methods and run.model.is_deterministic:
        raise ValueError(
            "this run's model is deterministic (g = 0): it has no variational bound; use "
            "--method ode."
        )
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}.")
    if NLLMethod.ODE in methods:
        check_solve_settings(
            solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, error_norm=error_norm
        )
    mesh = data_mesh() if mesh is None else mesh
    devices = int(mesh.devices.size)
    return resolve_chunks(num_chunks or devices, mesh, num_chunks, "`num_chunks`"), mesh


def evaluate_nll(
    run: LoadedRun,
    x: np.ndarray,
    methods: tuple[NLLMethod, ...] = (NLLMethod.ODE,),
    *,
    key: Key,
    trace: AbstractTraceEstimator | None = None,
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int = 4096,
    batch_size: int = 1000,
    bound_samples: int = 64,
    num_chunks: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX,
    labels: np.ndarray | None = None,
) -> dict[NLLMethod, NLLResult]:
    """The NLL of every example of `x` (data units, the run's data shape) by each of `methods`.

    A class-conditional run needs `labels`, one class per example: the result is then
    -log p(x_i | label_i).

    - `trace`: the ODE's divergence estimator (default `default_evaluation_trace` of the dimension).
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`, `error_norm`: the ODE solve, as in
      `log_likelihood`.
    - `batch_size`: examples per solve; `bound_samples`: Monte Carlo (t, eps) pairs per example.
    - `mesh`, `num_chunks`: every batch is split into `num_chunks` independent solves over the
      devices of `mesh` (default: all local devices, one chunk each).
    - `progress`: called with the number of examples done after each batch.

    Batch b uses the key `fold_in(key, b)`, so results do not depend on anything but the
    arguments. A ValueError names what is wrong before any solve starts.
    """
    num_chunks, mesh = check_evaluation(
        run,
        methods,
        solver=solver,
        rtol=rtol,
        atol=atol,
        steps=steps,
        max_steps=max_steps,
        batch_size=batch_size,
        num_chunks=num_chunks,
        mesh=mesh,
        error_norm=error_norm,
    )
    model = _nfdm_model(run)
    x = check_examples(run, x, "the data")
    labels = check_labels(run, labels, x.shape[0])
    dims = math.prod(model.data_shape)
    trace = default_evaluation_trace(dims) if trace is None else trace
    dequantization = _dequantization(run)
    log_jacobian = 0.0 if dequantization is not None else float(run.transform.log_det())
    total = x.shape[0]
    size = -(-min(batch_size, total) // num_chunks) * num_chunks  # whole chunks per batch
    values: dict[NLLMethod, list[np.ndarray]] = {m: [] for m in methods}
    stats: dict[NLLMethod, SolveStats] = {}
    solve: dict[str, Any] = dict(solver=solver, rtol=rtol, atol=atol, steps=steps)
    solve.update(max_steps=max_steps, mesh=mesh, num_chunks=num_chunks, error_norm=error_norm)
    for index, start in enumerate(range(0, total, size)):
        batch = x[start : start + size]
        count = batch.shape[0]
        pad = np.arange(size - count) % count
        batch = np.concatenate([batch, batch[pad]])
        context = None
        if labels is not None:
            context = jnp.asarray(np.concatenate([labels[start : start + size], labels[pad]]))
        if dequantization is None:
            model_batch = run.transform.to_model(jnp.asarray(batch, jnp.result_type(float)))
        else:
            model_batch = jnp.asarray(np.rint(batch).astype(np.int32))
        batch_key = jr.fold_in(key, index)
        for method in methods:
            if method is NLLMethod.ODE:
                estimate, batch_stats = log_likelihood(
                    model,
                    model_batch,
                    key=batch_key,
                    dequantization=dequantization,
                    trace=trace,
                    context=context,
                    **solve,
                )
                nll = -(np.asarray(estimate.value)[:count] + log_jacobian)
            else:
                estimate, batch_stats = variational_bound(
                    model,
                    model_batch,
                    key=batch_key,
                    num_samples=bound_samples,
                    dequantization=dequantization,
                    mesh=mesh,
                    time_power=BOUND_TIME_POWER,
                    context=context,
                )
                nll = np.asarray(estimate.value)[:count] - log_jacobian
            values[method].append(nll)
            batch_stats = eqx.tree_at(lambda s: s.num, batch_stats, count)
            stats[method] = (
                batch_stats if method not in stats else stats[method].combine(batch_stats)
            )
        if progress is not None:
            progress(count)
    return {m: NLLResult(m, np.concatenate(values[m]), stats[m]) for m in methods}
