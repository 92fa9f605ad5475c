"""Likelihoods: the probability-flow ODE, the variational bound of the stochastic model, and
bits/dim with dequantization for discrete data (docs/math.md, "The probability-flow ODE", "The
bound" and "Bits/dim").

Conventions: `log_likelihood` estimates log p(x) (nats, higher is better); `variational_bound`
estimates an upper bound on -log p(x) (nats). Both return an `Estimate` per example with its
Monte Carlo standard error (zero where the estimator is deterministic) and `SolveStats`.
"""

import math
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, Shaped

from ._custom_types import Key
from ._forward import standard_normal_log_prob
from ._loss import example_loss, importance_times
from ._model import NFDM, check_context
from ._sample import PER_EXAMPLE_DEFAULT
from ._sharding import DATA_AXIS, check_divisible, map_chunks, mesh_size, resolve_chunks
from ._solve import ErrorNorm, SolveReport, SolveStats, Stepping, report, saved, stepping, timed
from ._terms import AbstractTraceEstimator, ExactTrace, likelihood_term


class Estimate(eqx.Module):
    """Per-example estimates (`value`) and their Monte Carlo standard errors (`example_stderr`:
    zeros when exact; NaN when a random estimator has a single sample and so no spread to
    measure). `mean()` and `stderr()` summarise the batch."""

    value: Float[Array, " batch"]
    example_stderr: Float[Array, " batch"]

    def mean(self) -> float:
        """The mean over the batch."""
        return float(jnp.mean(self.value))

    def stderr(self) -> float:
        """The standard error of `mean()` over the examples: their spread / sqrt(batch), which
        includes each estimate's own Monte Carlo noise (NaN for a batch of one)."""
        n = self.value.shape[0]
        if n < 2:
            return math.nan
        return float(jnp.std(self.value, ddof=1)) / math.sqrt(n)


class Dequantization(eqx.Module):
    """Uniform dequantization of integer data in [0, K) into model space (docs/math.md, "Bits/dim").

        y = (x + u) / K,  u ~ U[0, 1)^D;   s = scale * y + shift

    so that log P(x) >= E_u[log p(s)] + sum_d log(scale_d) - D log K. The last two terms are the
    explicit `offset`: the change of variables from the integer grid to model space. `scale` and
    `shift` are scalars or arrays broadcastable to one example's shape (a per-dimension affine
    map, e.g. a run's data transform).
    """

    num_levels: int
    scale: float | Array = 2.0
    shift: float | Array = -1.0

    def __check_init__(self):
        if not (isinstance(self.num_levels, int) and self.num_levels >= 2):
            raise ValueError(f"`num_levels` must be an integer >= 2; got {self.num_levels!r}.")
        if not bool(jnp.all(jnp.asarray(self.scale) > 0)):
            raise ValueError(f"Dequantization `scale` must be positive; got {self.scale!r}.")

    def offset(self, shape: tuple[int, ...] | int) -> float:
        """sum_d log(scale_d) - D log(K) for one example of `shape` (or D = `shape`), to add to
        log p(s) for a lower bound on log P(x)."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        log_scale = np.broadcast_to(np.log(np.asarray(self.scale, np.float64)), shape)
        return float(np.sum(log_scale)) - math.prod(shape) * math.log(self.num_levels)

    def __call__(self, key: Key, x: Shaped[Array, " batch *shape"], dtype=None) -> Array:
        """Dequantized model-space points s for integer data `x`."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        u = jr.uniform(key, x.shape, dtype)
        y = (x.astype(dtype) + u) / self.num_levels
        return (jnp.asarray(self.scale, dtype) * y + jnp.asarray(self.shift, dtype)).astype(dtype)


def _check_data(model: NFDM, x: Array) -> None:
    if x.ndim < 1 or tuple(x.shape[1:]) != model.data_shape:
        raise ValueError(
            f"Expected a batch of data of shape (batch, {', '.join(map(str, model.data_shape))}) "
            f"for this model; got {tuple(x.shape)}."
        )


def _check_discrete(x: Array, dequantization: Dequantization) -> None:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        if not bool(jnp.all(x == jnp.round(x))):
            raise ValueError("Dequantization expects integer-valued data; got non-integers.")
    low, high = int(jnp.min(x)), int(jnp.max(x))
    if low < 0 or high >= dequantization.num_levels:
        raise ValueError(
            f"Dequantization with num_levels={dequantization.num_levels} expects integers in "
            f"[0, {dequantization.num_levels}); got values in [{low}, {high}]."
        )


def _continuous(model, x: Array, dequantization: "Dequantization | None", key: Key):
    """(x in model space, the log-density offset): integer data dequantized (with the change of
    variables' offset), anything else as floats of the default dtype (offset 0)."""
    if dequantization is None:
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.result_type(float))
        return x, 0.0
    _check_discrete(x, dequantization)
    return dequantization(key, x), dequantization.offset(model.data_shape)


def _estimate(samples: Array, random: bool) -> Estimate:
    """Mean and standard error over the last axis (K i.i.d. estimates per example)."""
    value = jnp.mean(samples, axis=-1)
    k = samples.shape[-1]
    if not random:
        stderr = jnp.zeros_like(value)
    elif k < 2:
        stderr = jnp.full_like(value, jnp.nan)
    else:
        stderr = jnp.std(samples, axis=-1, ddof=1) / math.sqrt(k)
    return Estimate(value, stderr)


def _likelihood_solve(
    model: NFDM,
    x: Array,
    probes: Array | None,
    trace: AbstractTraceEstimator,
    solver: dfx.AbstractSolver,
    settings: Stepping,
    context: Array | None = None,
) -> tuple[Array, SolveReport]:
    y0 = (x, jnp.zeros((x.shape[0], trace.num_estimates), x.dtype))
    sol = settings.solve(likelihood_term(model, trace), solver, y0, args=(probes, context))
    z1, delta_logp = saved(sol)
    log_prob = jax.vmap(standard_normal_log_prob)(z1[0])[:, None] + delta_logp[0]
    return log_prob, report(sol, solver, sde=False)


def _solve_batch(model, x, probes, trace, solver, settings, per_example, context=None):
    if per_example:

        def one(x_i, probes_i, c_i):
            probes_i = None if probes_i is None else probes_i[:, None]
            c_i = None if c_i is None else c_i[None]
            log_prob, rep = _likelihood_solve(
                model, x_i[None], probes_i, trace, solver, settings, c_i
            )
            return log_prob[0], rep

        probe_axis = None if probes is None else 1
        return jax.vmap(one, in_axes=(0, probe_axis, 0))(x, probes, context)
    return _likelihood_solve(model, x, probes, trace, solver, settings, context)


@eqx.filter_jit
def _log_likelihood_core(
    model, x, key, trace, solver, settings, per_example, num_chunks=1, mesh=None, context=None
):
    # Probes are drawn for the whole batch, so they do not depend on the chunking.
    probes = trace.probes(key, x)
    if num_chunks == 1 and mesh is None:
        return _solve_batch(model, x, probes, trace, solver, settings, per_example, context)

    def chunk(rows, shared, index):
        del index
        model, trace, solver, settings = shared
        x, probes, context = rows
        probes = None if probes is None else jnp.moveaxis(probes, 0, 1)
        return _solve_batch(model, x, probes, trace, solver, settings, per_example, context)

    # Probes are (estimates, batch, ...): chunk them along their batch axis.
    rows = (x, None if probes is None else jnp.moveaxis(probes, 1, 0), context)
    shared = (model, trace, solver, settings)
    log_prob, rep = map_chunks(chunk, rows, shared, num_chunks=num_chunks, mesh=mesh)
    return log_prob.reshape(x.shape[0], *log_prob.shape[2:]), rep


def log_likelihood(
    model: NFDM,
    x: Shaped[Array, " batch *shape"],
    *,
    key: Key | None = None,
    trace: AbstractTraceEstimator = ExactTrace(),
    solver: dfx.AbstractSolver = dfx.Dopri5(),
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    max_steps: int = 4096,
    error_norm: ErrorNorm = ErrorNorm.EXAMPLE_MAX,
    dequantization: Dequantization | None = None,
    per_example: bool = PER_EXAMPLE_DEFAULT,
    mesh: jax.sharding.Mesh | None = None,
    num_chunks: int | None = None,
    context: Shaped[Array, " batch *context"] | None = None,
) -> tuple[Estimate, SolveStats]:
    """log p(x) of the deterministic generative model through the probability-flow ODE.

    Integrates (z, delta_logp) from the data z_0 = x at t = 0 to t = 1 and returns
    log N(z_1; 0, I) + delta_logp, the log-density of the model's t = 0 marginal.

    **Arguments:**

    - `model`, `x`: the model and a batch of data in model space.
    - `key`: needed for Hutchinson probes and for dequantization.
    - `trace`: `ExactTrace(chunk_size)` or `Hutchinson(num_probes, RademacherProbe() |
      GaussianProbe())`; probes are drawn once per solve.
    - `solver`, `rtol`, `atol`, `steps`, `max_steps`: as in `sample` (ODE solvers only);
      adaptive at rtol = atol = 1e-5 by default.
    - `error_norm`: how a batch's step error is measured (`ErrorNorm`): the largest
      per-example RMS (default) or the RMS over the batch, which takes fewer steps and lets
      single examples' errors exceed the tolerance.
    - `dequantization`: for integer data; the result is then a (stochastic) lower bound on the
      discrete log P(x), offset included.
    - `per_example`: vmapped per-example solves instead of one solve over the batch.
    - `mesh`, `num_chunks`: spread the batch over the devices of a `data_mesh()` as
      `num_chunks` independent solves (default one per device), as in `sample`; a one-device
      run with the same `num_chunks` gives the same values.
    - `context`: for a conditional model, one context per example (class labels or vectors):
      the result is log p(x_i | c_i), all examples in one solve.

    **Returns:** `(Estimate(log p, example_stderr), SolveStats)`; the standard error is over the K
    Hutchinson probes of each example (zero for the exact trace).
    """
    _check_data(model, x)
    check_context(model, context, x.shape[0])
    settings = stepping(
        solver,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        sde=False,
        error_norm=error_norm,
    )
    if (trace.is_random or dequantization is not None) and key is None:
        raise ValueError("A `key` is needed for Hutchinson probes and for dequantization.")
    if key is None:
        key = jr.key(0)  # unused: nothing random
    probe_key, dequantization_key = jr.split(key)
    x, offset = _continuous(model, x, dequantization, dequantization_key)
    num = x.shape[0]
    num_chunks = resolve_chunks(num, mesh, num_chunks, "the batch size")
    # One device: the plain solve (bit-identical to no mesh at all).
    mesh = None if mesh is None or mesh_size(mesh) == 1 else mesh
    log_prob, stats = timed(
        _log_likelihood_core,
        model,
        x,
        probe_key,
        trace,
        solver,
        settings,
        per_example,
        num_chunks,
        mesh,
        context,
        num=num,
        solver=solver,
        settings=settings,
        per_example=per_example,
    )
    estimate = _estimate(log_prob, trace.is_random)
    return Estimate(estimate.value + offset, estimate.example_stderr), stats


@eqx.filter_jit
def _bound_core(model, x, key, num_samples, time_power, context=None):
    def one(x_i, key_i, c_i):
        model_i = model if c_i is None else model.conditioned(c_i)
        t_key, eps_key = jr.split(key_i)
        t, w = importance_times(num_samples, time_power, x_i.dtype, key=t_key)
        eps = jr.normal(eps_key, (num_samples, *x_i.shape), x_i.dtype)
        return jax.vmap(
            lambda t_j, eps_j, w_j: example_loss(model_i, x_i, t_j, eps_j, time_weight=w_j).total
        )(t, eps, w)

    return jax.vmap(one)(x, jr.split(key, x.shape[0]), context)


def variational_bound(
    model: NFDM,
    x: Shaped[Array, " batch *shape"],
    *,
    key: Key,
    num_samples: int = 64,
    dequantization: Dequantization | None = None,
    mesh: jax.sharding.Mesh | None = None,
    time_power: float = 1.0,
    context: Shaped[Array, " batch *context"] | None = None,
) -> tuple[Estimate, SolveStats]:
    """The variational upper bound on -log p(x) of the stochastic model, in nats (docs/math.md,
    "The bound").

    `time_power` > 1 importance-samples t = u^time_power (see `importance_times`): the same
    bound, usually with a smaller standard error.

    Monte Carlo over `num_samples` pairs (t, eps) per example, t stratified over [0, 1]; the
    standard error is the sample standard deviation over the pairs / sqrt(num_samples), which
    stratification makes conservative. `stats.nfe` counts evaluations of the per-example loss
    (each one predictor call and two forward-process calls). Needs g > 0: a deterministic model
    has no bound (use `log_likelihood`).

    `mesh`: shard the batch over the devices of a `data_mesh()` (the batch size must divide by
    their number); there is no solve, so this is plain data parallelism with the same values.
    `context`: one context per example for a conditional model (a bound on -log p(x_i | c_i)).
    """
    _check_data(model, x)
    check_context(model, context, x.shape[0])
    if model.is_deterministic:
        raise ValueError(
            "The variational bound needs a stochastic model (g > 0); this model has g = 0, so "
            "use the ODE likelihood (`log_likelihood`)."
        )
    if not (isinstance(num_samples, int) and num_samples >= 2):
        raise ValueError(f"`num_samples` must be an integer >= 2; got {num_samples!r}.")
    key, dequantization_key = jr.split(key)
    x, offset = _continuous(model, x, dequantization, dequantization_key)
    if mesh is not None:
        check_divisible(x.shape[0], mesh, "the batch size")
        x = jax.device_put(x, NamedSharding(mesh, P(DATA_AXIS)))
        if context is not None:
            context = jax.device_put(context, NamedSharding(mesh, P(DATA_AXIS)))
    start = time.perf_counter()
    samples = jax.block_until_ready(
        _bound_core(model, x, key, num_samples, float(time_power), context)
    )
    seconds = time.perf_counter() - start
    estimate = _estimate(samples, True)
    stats = SolveStats(
        num=x.shape[0],
        nfe=float(num_samples),
        nfe_max=num_samples,
        accepted_steps=0.0,
        rejected_steps=0.0,
        seconds=seconds,
    )
    return Estimate(estimate.value - offset, estimate.example_stderr), stats


def bits_per_dim(nll: Float[Array, "*batch"], num_dims: int) -> Float[Array, "*batch"]:
    """Convert a negative log-likelihood in nats per example into bits per dimension.

    For discrete data pass the NLL of `log_likelihood`/`variational_bound` computed with a
    `Dequantization`, which already includes the D log(scale) - D log(K) offset.
    """
    if not (isinstance(num_dims, int) and num_dims >= 1):
        raise ValueError(f"`num_dims` must be a positive integer; got {num_dims!r}.")
    return jnp.asarray(nll) / (num_dims * math.log(2.0))
