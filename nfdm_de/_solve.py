"""Shared machinery of every solve: step settings, honest NFE accounting, failure checks, timing.

NFE (number of function evaluations) counts *vector-field evaluations per example*, not Diffrax's
step count: an explicit Runge-Kutta step with s stages costs s evaluations, or s - 1 for a
first-same-as-last (FSAL) tableau plus one evaluation at the start of the solve; rejected steps
cost the same as accepted ones. The counts below are checked in the tests against an
instrumented vector field for every supported solver, fixed and adaptive.
"""

import enum
import time
from collections.abc import Callable
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import PyTree

ODE_SOLVERS: tuple[type[dfx.AbstractSolver], ...] = (
    dfx.Euler,
    dfx.Heun,
    dfx.Midpoint,
    dfx.Ralston,
    dfx.Bosh3,
    dfx.Tsit5,
    dfx.Dopri5,
    dfx.Dopri8,
)
SDE_SOLVERS: tuple[type[dfx.AbstractSolver], ...] = (
    dfx.Euler,
    dfx.Heun,
    dfx.SRA1,
    dfx.ShARK,
    dfx.SEA,
)

DEFAULT_TOLERANCE = 1e-5
# Adaptive SDE solvers control the strong (pathwise) error, which converges at order ~1 at
# best: 1e-5 would take thousands of steps, so the SDE default is looser.
DEFAULT_SDE_TOLERANCE = 1e-3
# The first trial step of an adaptive solve. Passed explicitly so that no solver-specific
# step-size search spends (uncounted) evaluations; the PID controller adapts from here.
INITIAL_STEP = 0.01


def _names(solvers) -> str:
    return ", ".join(s.__name__ for s in solvers)


def check_solver(solver: dfx.AbstractSolver, *, sde: bool) -> None:
    allowed = SDE_SOLVERS if sde else ODE_SOLVERS
    if not isinstance(solver, allowed):
        kind = "SDE" if sde else "ODE"
        raise ValueError(
            f"{type(solver).__name__} is not a supported {kind} solver; expected one of "
            f"{_names(allowed)}."
        )


def evaluations(solver: dfx.AbstractSolver, *, sde: bool) -> tuple[int, int]:
    """(vector-field evaluations per step, evaluations once at the start) for `solver`.

    For an SDE the count is of the drift (the network); g(t) is a cheap scalar function.
    """
    check_solver(solver, sde=sde)
    if isinstance(solver, dfx.Euler):
        return 1, 0
    if isinstance(solver, dfx.AbstractSRK):
        tableau = solver.tableau
        stages = len(tableau.c) + 1
        if tableau.ignore_stage_f is not None:
            stages -= int(np.sum(tableau.ignore_stage_f))
        return stages, 0
    if isinstance(solver, dfx.AbstractERK) and isinstance(solver.tableau, dfx.ButcherTableau):
        stages = len(solver.tableau.c) + 1
        # Diffrax turns FSAL off for expensive (non-ODE) terms: it then contracts every stage.
        if solver.tableau.fsal and not sde:
            return stages - 1, 1
        return stages, 0
    raise ValueError(f"No evaluation count known for {type(solver).__name__}.")


def is_adaptive(solver: dfx.AbstractSolver) -> bool:
    """Whether the solver carries an error estimate (so rtol/atol can drive its step size)."""
    if isinstance(solver, dfx.AbstractSRK):
        return solver.tableau.b_error is not None
    return isinstance(solver, dfx.AbstractAdaptiveSolver)


def max_example_rms(y) -> jax.Array:
    """The error norm of a batched solve: RMS within each example, max over the batch.

    Diffrax's default RMS over the whole state would average one example's error with the
    others' and let it drift far above the requested tolerance; the max keeps every example at
    least as accurate as its own solve would be.
    """
    leaves = jtu.tree_leaves(y)
    batch = leaves[0].shape[0]
    squares = sum(jnp.sum(jnp.abs(leaf.reshape(batch, -1)) ** 2, axis=1) for leaf in leaves)
    count = sum(int(np.prod(leaf.shape[1:])) for leaf in leaves)
    return jnp.sqrt(jnp.max(squares) / count)


def batch_rms(y) -> jax.Array:
    """The error norm of a batched solve as one state: RMS over every example's entries.

    Cheaper than `max_example_rms` (fewer steps), but one example's error can sit above the
    tolerance when the others' are below it.
    """
    leaves = jtu.tree_leaves(y)
    squares = sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in leaves)
    count = sum(leaf.size for leaf in leaves)
    return jnp.sqrt(squares / count)


class ErrorNorm(enum.Enum):
    """How an adaptive solve over a batch measures its local error against rtol/atol.

    - `EXAMPLE_MAX` (default): the largest per-example RMS (`max_example_rms`); every example
      is solved at least as accurately as alone.
    - `BATCH_RMS`: the RMS over the whole batch (`batch_rms`), Diffrax's default norm (and
      close to torchdiffeq's, the largest of each state component's RMS over the batch):
      fewer steps, with individual examples' errors above the tolerance.
    """

    EXAMPLE_MAX = "example-max"
    BATCH_RMS = "batch-rms"

    @property
    def function(self) -> Callable[[PyTree], jax.Array]:
        return max_example_rms if self is ErrorNorm.EXAMPLE_MAX else batch_rms


class Stepping(eqx.Module):
    """Resolved step settings of one solve: a fixed uniform grid or an adaptive PID controller."""

    controller: dfx.AbstractStepSizeController
    dt0: float | None
    max_steps: int
    adaptive: bool = eqx.field(static=True)

    def solve(
        self,
        terms,
        solver: dfx.AbstractSolver,
        y0,
        *,
        args=None,
        saveat: dfx.SaveAt = dfx.SaveAt(t1=True),
        adjoint: dfx.AbstractAdjoint = dfx.RecursiveCheckpointAdjoint(),
    ) -> dfx.Solution:
        """`diffeqsolve` over the unit interval with these step settings. `throw=False`: a solve
        that runs out of steps is reported by `report`, whose caller raises a clear error."""
        return dfx.diffeqsolve(
            terms,
            solver,
            0.0,
            1.0,
            self.dt0,
            y0,
            args=args,
            saveat=saveat,
            stepsize_controller=self.controller,
            max_steps=self.max_steps,
            adjoint=adjoint,
            throw=False,
        )


def check_solve_settings(
    solver: dfx.AbstractSolver,
    *,
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 4096,
    sde: bool = False,
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX,
) -> None:
    """Raise the ValueError a solve with these settings would raise, before any work starts:
    the solver's kind (ODE or SDE), `steps` exclusive with `rtol`/`atol`, a step count for a
    fixed-step solver, positive tolerances and step budget, an `ErrorNorm`."""
    stepping(
        solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        sde=sde,
        error_norm=error_norm,
    )


def stepping(
    solver: dfx.AbstractSolver,
    *,
    steps: int | None,
    rtol: float | None,
    atol: float | None,
    max_steps: int,
    sde: bool,
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX,
) -> Stepping:
    """Validate the step settings against the solver and build the controller.

    `steps` (a uniform grid of that many steps) and `rtol`/`atol` (adaptive) are exclusive;
    with neither, an adaptive solver runs at rtol = atol = 1e-5 (1e-3 for an SDE) and a
    fixed-step-only solver is an error. `error_norm` measures an adaptive step's error.
    """
    check_solver(solver, sde=sde)
    if not isinstance(error_norm, ErrorNorm):
        choices = ", ".join(f"ErrorNorm.{n.name}" for n in ErrorNorm)
        raise ValueError(f"`error_norm` must be one of {choices}; got {error_norm!r}.")
    name = type(solver).__name__
    tolerances = rtol is not None or atol is not None
    if steps is not None:
        if tolerances:
            raise ValueError(
                f"Give either a fixed step count (steps={steps}) or adaptive tolerances "
                f"(rtol={rtol}, atol={atol}), not both."
            )
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"`steps` must be a positive integer; got {steps!r}.")
        steps = int(steps)
        grid = jnp.linspace(0.0, 1.0, steps + 1)
        # StepTo on an exact grid: a ConstantStepSize of 1/steps can add a sliver step to
        # rounding.
        return Stepping(dfx.StepTo(ts=grid), None, steps, adaptive=False)
    if not is_adaptive(solver):
        if tolerances:
            raise ValueError(
                f"{name} is a fixed-step solver (it has no error estimate), so rtol/atol do not "
                f"apply; give a step count instead."
            )
        raise ValueError(f"{name} is a fixed-step solver: give a step count (`steps`).")
    default = DEFAULT_SDE_TOLERANCE if sde else DEFAULT_TOLERANCE
    rtol = default if rtol is None else rtol
    atol = default if atol is None else atol
    for label, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, int | float) and value > 0):
            raise ValueError(f"`{label}` must be a positive number; got {value!r}.")
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}.")
    controller = dfx.PIDController(rtol=rtol, atol=atol, norm=error_norm.function)
    return Stepping(controller, INITIAL_STEP, max_steps, adaptive=True)


class SolveStats(eqx.Module):
    """Cost of a sampling or likelihood call.

    - `num`: examples.
    - `nfe`: vector-field evaluations per example (mean over examples; all stages and rejected
      steps included). For a joint solve over the batch every example sees every evaluation.
    - `nfe_max`: the largest per-example count.
    - `accepted_steps`, `rejected_steps`: per example (mean).
    - `seconds`: wall-clock time of the call, including compilation on a first call.
    """

    num: int
    nfe: float
    nfe_max: int
    accepted_steps: float
    rejected_steps: float
    seconds: float

    def combine(self, other: "SolveStats") -> "SolveStats":
        """Stats of two calls on disjoint data (for streaming over batches)."""
        total = self.num + other.num

        def mean(a, b):
            return (self.num * a + other.num * b) / total

        return SolveStats(
            num=total,
            nfe=mean(self.nfe, other.nfe),
            nfe_max=max(self.nfe_max, other.nfe_max),
            accepted_steps=mean(self.accepted_steps, other.accepted_steps),
            rejected_steps=mean(self.rejected_steps, other.rejected_steps),
            seconds=self.seconds + other.seconds,
        )


class SolveReport(eqx.Module):
    """What a jitted solve hands back besides its results (per solve; batched when vmapped)."""

    nfe: jax.Array
    accepted: jax.Array
    rejected: jax.Array
    max_steps_reached: jax.Array
    failed: jax.Array


def saved(sol: dfx.Solution) -> PyTree:
    """The values `sol` saved (`ys`); Diffrax types them as optional for a `SaveAt` that saves
    nothing, which no solve here uses."""
    if sol.ys is None:
        raise ValueError("the solve saved no values; its SaveAt must save t1 or some ts.")
    return sol.ys


def report(sol: dfx.Solution, solver: dfx.AbstractSolver, *, sde: bool) -> SolveReport:
    per_step, initial = evaluations(solver, sde=sde)
    stats = sol.stats
    return SolveReport(
        nfe=initial + per_step * stats["num_steps"],
        accepted=stats["num_accepted_steps"],
        rejected=stats["num_rejected_steps"],
        max_steps_reached=sol.result == dfx.RESULTS.max_steps_reached,
        failed=sol.result != dfx.RESULTS.successful,
    )


def timed(
    fn: Callable[..., tuple[Any, SolveReport]],
    *args,
    num: int,
    solver: dfx.AbstractSolver,
    settings: Stepping,
    per_example: bool,
) -> tuple[Any, SolveStats]:
    """Run a jitted solve, wait for it, check it finished, and turn its report into stats.

    Running out of `max_steps` is an error, never a silently truncated answer.
    """
    start = time.perf_counter()
    out, rep = fn(*args)
    out, rep = jax.block_until_ready((out, rep))
    seconds = time.perf_counter() - start
    name = type(solver).__name__
    if bool(np.any(rep.max_steps_reached)):
        raise RuntimeError(
            f"The {name} solve used all max_steps={settings.max_steps} steps before reaching the "
            f"end of the time interval. Raise max_steps, loosen rtol/atol, or use a fixed step "
            f"count."
        )
    if bool(np.any(rep.failed)):
        raise RuntimeError(
            f"The {name} solve failed (non-finite values or a step size underflow); the model "
            f"or the tolerances are likely unsuitable."
        )
    nfe = np.asarray(rep.nfe)
    if per_example:
        nfe = np.broadcast_to(nfe.reshape(-1), (num,))
    elif nfe.ndim == 1:  # one count per independent chunk of equal size
        nfe = np.repeat(nfe, num // nfe.size)
    return out, SolveStats(
        num=num,
        nfe=float(np.mean(nfe)),
        nfe_max=int(np.max(nfe)),
        accepted_steps=float(np.mean(rep.accepted)),
        rejected_steps=float(np.mean(rep.rejected)),
        seconds=seconds,
    )
