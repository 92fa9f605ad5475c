"""Maximum-likelihood training through the probability-flow ODE (the `likelihood` phase).

The simulation-free objective (docs/math.md, "The bound") bounds -log p of the *stochastic*
model; the ODE NLL that `log_likelihood` reports is a different quantity, and on the toy sets
it stays far from the truth long after the bound has flattened. For small dimensions the ODE NLL
itself is cheap enough to differentiate: solve the augmented ODE (z, delta_logp) with the exact
trace (D JVPs per evaluation) or Hutchinson's estimator (one per probe) by an adaptive solver at
a loose tolerance, and backpropagate through the solver's steps (discretise-then-optimise;
Diffrax's `RecursiveCheckpointAdjoint`).
"""

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped

from ._custom_types import Key, Scalar
from ._likelihood import _likelihood_solve
from ._model import NFDM, check_context
from ._solve import ErrorNorm, check_solver, stepping
from ._terms import AbstractTraceEstimator, ExactTrace


class LikelihoodSolve(eqx.Module):
    """How the ODE NLL is solved while training on it: `solver` at `rtol` = `atol` = `tol`,
    giving up (a non-finite loss) after `max_steps` steps, with the divergence from `trace`.

    A loose tolerance is enough: the gradient of the discretised NLL is what is followed, and
    evaluation re-solves at 1e-5. 1e-3 with Tsit5 took 10-15 steps per solve on the toy sets.

    `trace` = `Hutchinson()` replaces the D JVPs of the exact divergence by one per probe. The
    NLL is linear in the divergence integral, so the loss and its gradient stay unbiased (the
    probes are fixed within a solve, as `log_likelihood` does); that pays for itself as D grows.
    """

    solver: dfx.AbstractSolver = dfx.Tsit5()
    tol: float = 1e-3
    max_steps: int = 1024
    trace: AbstractTraceEstimator = ExactTrace()
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX

    def __check_init__(self):
        if not (isinstance(self.tol, int | float) and 0 < self.tol < 1):
            raise ValueError(f"`tol` must be a number in (0, 1); got {self.tol!r}.")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"`max_steps` must be a positive integer; got {self.max_steps!r}.")
        check_solver(self.solver, sde=False)
        if not isinstance(self.trace, AbstractTraceEstimator):
            raise ValueError(
                f"`trace` must be a trace estimator (ExactTrace, Hutchinson); got {self.trace!r}."
            )


def ode_nll(
    model: NFDM,
    x: Float[Array, " batch dim"],
    settings: LikelihoodSolve = LikelihoodSolve(),
    *,
    key: Key | None = None,
    context: Shaped[Array, " batch *context"] | None = None,
) -> tuple[Float[Array, " batch"], Int[Array, ""]]:
    """-log p(x) of the probability-flow ODE per example (model space, nats), differentiable
    with respect to the model; and the number of solver steps taken (all examples share one
    adaptive solve). A random `settings.trace` (Hutchinson) needs `key` for its probes and
    returns the mean of its estimates. A conditional model takes one `context` per example.

    Examples whose solve did not finish within `max_steps` get NaN, so a training loop sees a
    non-finite loss instead of a silently truncated one.
    """
    if x.ndim != 2 or x.shape[1:] != model.data_shape:
        raise ValueError(
            f"ode_nll expects a batch of vectors of shape (batch, {model.data_shape[0]}); got "
            f"{tuple(x.shape)} (the likelihood phase supports vector data only)."
        )
    check_context(model, context, x.shape[0])
    probes = None
    if settings.trace.is_random:
        if key is None:
            raise ValueError("ode_nll with a random trace estimator (Hutchinson) needs a `key`.")
        probes = settings.trace.probes(key, x)
    # The same augmented solve as `log_likelihood` (one adaptive solve over the batch), at the
    # phase's loose tolerance; Diffrax's default adjoint backpropagates through its steps.
    steps = stepping(
        settings.solver,
        steps=None,
        rtol=settings.tol,
        atol=settings.tol,
        max_steps=settings.max_steps,
        sde=False,
        error_norm=settings.error_norm,
    )
    log_prob, solve = _likelihood_solve(
        model, x, probes, settings.trace, settings.solver, steps, context
    )
    nll = -jnp.mean(log_prob, axis=1)
    return jnp.where(solve.failed, jnp.nan, nll), solve.accepted + solve.rejected


def ode_nll_loss(
    model: NFDM,
    x: Float[Array, " batch dim"],
    settings: LikelihoodSolve = LikelihoodSolve(),
    *,
    key: Key | None = None,
    context: Shaped[Array, " batch *context"] | None = None,
) -> Scalar:
    """The batch-mean ODE NLL: the objective of the likelihood phase."""
    nll, _ = ode_nll(model, x, settings, key=key, context=context)
    return jnp.mean(nll)
