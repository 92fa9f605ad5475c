"""The one adapter between the model and Diffrax's `(t, y, args)` vector-field convention.

Every solve runs *forward* in its own time variable (docs/math.md, "Solvers and NFE"): the
generative direction (noise at t = 1 to data at t = 0) is integrated in s = 1 - t from s = 0 to
s = 1, because several
SDE solvers are wrong when run backwards; the likelihood ODE runs from data to noise, already
forward in t.

The state of every term is a *batch* `(batch, *data_shape)`: the model is vmapped over the
leading axis inside the vector field, so one solve can carry a whole batch (one adaptive step
size for all of it) or, vmapped at the call site over batches of one, each example alone.
"""

import abc
import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
from jaxtyping import Array, Float

from ._custom_types import Key
from ._model import NFDM

Batch = Float[Array, " batch *shape"]


def _per_example(fn, z: Array, t: Array) -> Array:
    return jax.vmap(fn, in_axes=(0, None))(z, t)


def _velocities(model: NFDM, z: Array, t: Array, context: Array | None) -> Array:
    """v(z_i, t) for every row, each under its own context when `context` is given."""
    if context is None:
        return _per_example(model.velocity, z, t)
    return jax.vmap(lambda z_i, c_i: model.conditioned(c_i).velocity(z_i, t))(z, context)


def generative_ode_term(model: NFDM) -> dfx.ODETerm:
    """dz/ds = -v(z, 1 - s): the probability-flow ODE from noise (s = 0) to data (s = 1)."""

    def vector_field(s, z, args):
        del args
        t = jnp.asarray(1 - s, z.dtype)
        return -_per_example(model.velocity, z, t)

    return dfx.ODETerm(vector_field)


def generative_sde_terms(model: NFDM, brownian: dfx.AbstractBrownianPath) -> dfx.MultiTerm:
    """dz = -f_hat(z, 1 - s) ds + g(1 - s) dW_s: the generative SDE in forward time s = 1 - t.

    With t = 1 - s the reverse-time SDE dz = f_hat dt + g dw_bar becomes an ordinary forward SDE
    in s. The noise is additive (g depends on time only), which the stochastic Runge-Kutta
    solvers SRA1, ShARK and SEA require.
    """

    def drift(s, z, args):
        del args
        t = jnp.asarray(1 - s, z.dtype)
        return -_per_example(model.drift, z, t)

    def diffusion(s, z, args):
        del args
        g = jnp.asarray(model.diffusion(1 - s), z.dtype)
        return lx.DiagonalLinearOperator(jnp.full(z.shape, g))

    return dfx.MultiTerm(dfx.ODETerm(drift), dfx.ControlTerm(diffusion, brownian))


class AbstractTraceEstimator(eqx.Module):
    """Estimates the divergence tr(dv/dz) of the generative velocity for the likelihood ODE.

    `probes` is called once per solve (never inside the vector field: redrawing random probes
    at every evaluation would turn the ODE into a rough SDE and break adaptive error control);
    `divergence` then evaluates v and `num_estimates` divergence estimates per example, all from
    one linearisation of v (one evaluation of the network per call).
    """

    @property
    @abc.abstractmethod
    def num_estimates(self) -> int:
        """Number of divergence estimates per example carried through the solve."""

    @abc.abstractmethod
    def probes(self, key: Key, z: Batch) -> Array | None:
        """Random probes for one solve over the batch `z`, or None if not random."""

    @abc.abstractmethod
    def divergence(
        self, velocity, z: Batch, probes: Array | None
    ) -> tuple[Batch, Float[Array, " batch estimates"]]:
        """(v(z), divergence estimates) for the batched velocity `velocity: z -> v`."""

    @property
    def is_random(self) -> bool:
        return False


class ExactTrace(AbstractTraceEstimator):
    """The exact divergence: sum_i e_i^T (dv/dz) e_i over the D basis vectors.

    The basis vectors go through the linearised velocity one at a time (None, the default) or
    `chunk_size` at a time, vectorised. One at a time was the fastest on CPU: with D = 8 and 256
    or 5,000 examples, chunks of 1, 2, 4 or all 8 took 1.4-2.9x as long.
    """

    chunk_size: int | None = None

    def __check_init__(self):
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"ExactTrace chunk_size must be >= 1 or None; got {self.chunk_size}.")

    @property
    def num_estimates(self) -> int:
        return 1

    def probes(self, key: Key, z: Batch) -> None:
        del key, z
        return None

    def divergence(self, velocity, z, probes):
        del probes
        v, jvp = jax.linearize(velocity, z)
        shape = z.shape[1:]
        size = math.prod(shape)
        basis = jnp.eye(size, dtype=z.dtype).reshape(size, *shape)

        def diagonal_entry(e):
            tangent = jnp.broadcast_to(e, z.shape)
            return jnp.sum((jvp(tangent) * tangent).reshape(z.shape[0], -1), axis=1)

        entries = jax.lax.map(diagonal_entry, basis, batch_size=self.chunk_size)
        return v, jnp.sum(entries, axis=0)[:, None]


class AbstractProbeDistribution(eqx.Module):
    """Distribution of Hutchinson probes u: zero mean, identity covariance."""

    @abc.abstractmethod
    def sample(self, shape: tuple[int, ...], dtype, *, key: Key) -> Array:
        """Draw probes of the given shape."""


class RademacherProbe(AbstractProbeDistribution):
    """u_i = +-1 with equal probability: the lowest-variance choice for Hutchinson."""

    def sample(self, shape, dtype, *, key):
        return jr.rademacher(key, shape, dtype)


class GaussianProbe(AbstractProbeDistribution):
    """u ~ N(0, I)."""

    def sample(self, shape, dtype, *, key):
        return jr.normal(key, shape, dtype)


class Hutchinson(AbstractTraceEstimator):
    """Hutchinson's estimator E[u^T (dv/dz) u] with `num_probes` probes per example.

    Each probe is carried as its own log-density integral through the solve, so the K integrals
    are i.i.d. given x and their spread gives the estimator's standard error.
    """

    num_probes: int = 1
    distribution: AbstractProbeDistribution = RademacherProbe()

    def __check_init__(self):
        if not (isinstance(self.num_probes, int) and self.num_probes >= 1):
            raise ValueError(
                f"Hutchinson num_probes must be an integer >= 1; got {self.num_probes}."
            )

    @property
    def num_estimates(self) -> int:
        return self.num_probes

    @property
    def is_random(self) -> bool:
        return True

    def probes(self, key, z):
        return self.distribution.sample((self.num_probes, *z.shape), z.dtype, key=key)

    def divergence(self, velocity, z, probes):
        v, jvp = jax.linearize(velocity, z)
        batch = z.shape[0]

        def estimate(u):
            return jnp.sum((jvp(u) * u).reshape(batch, -1), axis=1)

        return v, jnp.transpose(jax.vmap(estimate)(probes))


def likelihood_term(model: NFDM, trace: AbstractTraceEstimator) -> dfx.ODETerm:
    """The augmented ODE in t from data (t = 0) to noise (t = 1):

        dz/dt = v(z, t),        d(delta_logp)/dt = div v(z, t)   (one column per estimate)

    so that log p_0(x) = log N(z_1; 0, I) + delta_logp(1). `args` holds the probes of the solve
    and the per-example contexts of a conditional model (or None).
    """

    def vector_field(t, y, args):
        probes, context = args
        z, _ = y
        t = jnp.asarray(t, z.dtype)
        v, divergence = trace.divergence(lambda z_: _velocities(model, z_, t, context), z, probes)
        return v, divergence.astype(z.dtype)

    return dfx.ODETerm(vector_field)
