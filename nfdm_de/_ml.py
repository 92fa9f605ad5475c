"""Maximum-likelihood training through the probability-flow ODE (the `likelihood` phase).

The simulation-free objective (DESIGN §2.3) bounds -log p of the *stochastic* model; the ODE
NLL that `log_likelihood` reports is a different quantity, and on the toy sets it stays far from
the truth long after the bound has flattened. For small dimensions the ODE NLL itself is cheap
enough to differentiate: solve the augmented ODE (z, delta_logp) with the exact trace (D JVPs
per evaluation) by an adaptive solver at a loose tolerance, and backpropagate through the
solver's steps (discretise-then-optimise; Diffrax's `RecursiveCheckpointAdjoint`).
"""

import math

import diffrax as dfx
import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._custom_types import Scalar
from ._model import NFDM
from ._solve import INITIAL_STEP, check_solver
from ._terms import ExactTrace, likelihood_term


class LikelihoodSolve(eqx.Module):
    """How the ODE NLL is solved while training on it: `solver` at `rtol` = `atol` = `tol`,
    giving up (a non-finite loss) after `max_steps` steps.

    A loose tolerance is enough: the gradient of the discretised NLL is what is followed, and
    evaluation re-solves at 1e-5. 1e-3 with Tsit5 took 10-15 steps per solve on the toy sets.
    """

    solver: dfx.AbstractSolver = dfx.Tsit5()
    tol: float = 1e-3
    max_steps: int = 1024

    def __check_init__(self):
        if not (isinstance(self.tol, int | float) and 0 < self.tol < 1):
            raise ValueError(f"`tol` must be a number in (0, 1); got {self.tol!r}.")
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"`max_steps` must be a positive integer; got {self.max_steps!r}.")
        check_solver(self.solver, sde=False)


def ode_nll(
    model: NFDM,
    x: Float[Array, " batch dim"],
    settings: LikelihoodSolve = LikelihoodSolve(),
) -> tuple[Float[Array, " batch"], Int[Array, ""]]:
    """-log p(x) of the probability-flow ODE per example (model space, nats), differentiable
    with respect to the model; and the number of solver steps taken (all examples share one
    adaptive solve).

    Examples whose solve did not finish within `max_steps` get NaN, so a training loop sees a
    non-finite loss instead of a silently truncated one.
    """
    if x.ndim != 2 or x.shape[1:] != model.data_shape:
        raise ValueError(
            f"ode_nll expects a batch of vectors of shape (batch, {model.data_shape[0]}); got "
            f"{tuple(x.shape)} (the likelihood phase supports vector data only)."
        )
    y0 = (x, jnp.zeros((x.shape[0], 1), x.dtype))
    solution = dfx.diffeqsolve(
        likelihood_term(model, ExactTrace()),
        settings.solver,
        0.0,
        1.0,
        INITIAL_STEP,
        y0,
        stepsize_controller=dfx.PIDController(rtol=settings.tol, atol=settings.tol),
        max_steps=settings.max_steps,
        adjoint=dfx.RecursiveCheckpointAdjoint(),
        throw=False,
    )
    z1, delta_logp = solution.ys
    z1, delta_logp = z1[0], delta_logp[0, :, 0]
    dim = z1.shape[1]
    log_prior = -0.5 * jnp.sum(z1**2, axis=1) - 0.5 * dim * math.log(2 * math.pi)
    nll = -(log_prior + delta_logp)
    finished = solution.result == dfx.RESULTS.successful
    return jnp.where(finished, nll, jnp.nan), solution.stats["num_steps"]


def ode_nll_loss(
    model: NFDM, x: Float[Array, " batch dim"], settings: LikelihoodSolve = LikelihoodSolve()
) -> Scalar:
    """The batch-mean ODE NLL: the objective of the likelihood phase."""
    nll, _ = ode_nll(model, x, settings)
    return jnp.mean(nll)
