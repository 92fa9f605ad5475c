"""Sampling from the generative process: the probability-flow ODE or the SDE (docs/math.md,
"The generative process" and "Solvers and NFE")."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

from ._custom_types import Context, Key
from ._model import NFDM
from ._sharding import map_chunks, mesh_size, resolve_chunks
from ._solve import SolveReport, SolveStats, Stepping, report, saved, stepping, timed
from ._terms import generative_ode_term, generative_sde_terms

# Measured with benchmarks/nll_batching.py: one adaptive solve carrying the whole batch is far
# cheaper than a vmapped solve per example (docs/likelihood.md). Sampling uses the same default.
PER_EXAMPLE_DEFAULT = False


def _generative_solve(
    model: NFDM,
    key: Key,
    z1: Array,
    solver: dfx.AbstractSolver,
    settings: Stepping,
    sde: bool,
    brownian_tol: float,
    saveat: dfx.SaveAt,
) -> tuple[Array, SolveReport]:
    if sde:
        levy_area = (
            dfx.SpaceTimeLevyArea if isinstance(solver, dfx.AbstractSRK) else dfx.BrownianIncrement
        )
        shape = jax.ShapeDtypeStruct(z1.shape, z1.dtype)
        if settings.adaptive:
            brownian = dfx.VirtualBrownianTree(
                0.0, 1.0, tol=brownian_tol, shape=shape, key=key, levy_area=levy_area
            )
            adjoint = dfx.RecursiveCheckpointAdjoint()
        else:
            # A fixed grid needs one independent increment per step: no virtual Brownian tree.
            brownian = dfx.UnsafeBrownianPath(shape=shape, key=key, levy_area=levy_area)
            adjoint = dfx.ForwardMode()
        terms = generative_sde_terms(model, brownian)
    else:
        terms = generative_ode_term(model)
        adjoint = dfx.RecursiveCheckpointAdjoint()
    sol = settings.solve(terms, solver, z1, saveat=saveat, adjoint=adjoint)
    return saved(sol), report(sol, solver, sde=sde)


def _solve_batch(model, brownian_key, z1, solver, settings, sde, brownian_tol, saveat, per_example):
    if per_example:
        keys = jr.split(brownian_key, z1.shape[0])

        def one(z, k):
            ys, rep = _generative_solve(
                model, k, z[None], solver, settings, sde, brownian_tol, saveat
            )
            return ys[:, 0], rep

        ys, rep = jax.vmap(one)(z1, keys)
        return jnp.moveaxis(ys, 0, 1), rep
    return _generative_solve(model, brownian_key, z1, solver, settings, sde, brownian_tol, saveat)


@eqx.filter_jit
def _sample_core(
    model,
    key,
    num,
    solver,
    settings,
    sde,
    brownian_tol,
    saveat,
    per_example,
    num_chunks=1,
    mesh=None,
):
    noise_key, brownian_key = jr.split(key)
    dtype = jnp.result_type(float)
    z1 = jr.normal(noise_key, (num, *model.data_shape), dtype)
    if num_chunks == 1 and mesh is None:
        return _solve_batch(
            model, brownian_key, z1, solver, settings, sde, brownian_tol, saveat, per_example
        )

    def chunk(z, shared, index):
        model, brownian_key, solver, settings, saveat = shared
        # Chunk i's Brownian motion comes from fold_in(key, i), wherever the chunk runs.
        chunk_key = jr.fold_in(brownian_key, index)
        return _solve_batch(
            model, chunk_key, z, solver, settings, sde, brownian_tol, saveat, per_example
        )

    shared = (model, brownian_key, solver, settings, saveat)
    ys, rep = map_chunks(chunk, z1, shared, num_chunks=num_chunks, mesh=mesh)
    # (chunks, times, rows per chunk, ...) -> (times, num, ...)
    ys = jnp.moveaxis(ys, 0, 1)
    return ys.reshape(ys.shape[0], num, *ys.shape[3:]), rep


def _timed_solve(
    model, key, num, solver, settings, sde, brownian_tol, saveat, per_example, chunks=1, mesh=None
):
    """`_sample_core` with its wall time and NFE as `SolveStats`."""
    args = (model, key, num, solver, settings, sde, brownian_tol, saveat, per_example, chunks)
    return timed(
        _sample_core,
        *args,
        mesh,
        num=num,
        solver=solver,
        settings=settings,
        per_example=per_example,
    )


def _conditioned(model: NFDM, context: Context | None) -> NFDM:
    if context is not None:
        return model.conditioned(context)
    if model.is_conditional and model.context is None:
        raise ValueError(
            "this model is conditional: pass the `context` to sample under (e.g. a class label)."
        )
    return model


def _settings(solver, steps, rtol, atol, max_steps, sde, num):
    if not (isinstance(num, int) and num >= 1):
        raise ValueError(f"`num` must be a positive integer; got {num!r}.")
    return stepping(solver, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, sde=sde)


def sample(
    model: NFDM,
    num: int,
    *,
    key: Key,
    solver: dfx.AbstractSolver = dfx.Tsit5(),
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    sde: bool = False,
    max_steps: int = 4096,
    brownian_tol: float = 1e-3,
    per_example: bool = PER_EXAMPLE_DEFAULT,
    mesh: jax.sharding.Mesh | None = None,
    num_chunks: int | None = None,
    context: Context | None = None,
) -> tuple[Float[Array, " num *shape"], SolveStats]:
    """Draw `num` samples by solving the generative dynamics from z_1 ~ N(0, I) to t = 0.

    **Arguments:**

    - `model`: the `NFDM` (use the EMA weights of a run for best samples).
    - `key`: PRNG key for the initial noise and, with `sde=True`, the Brownian motion.
    - `num`: number of samples.
    - `solver`: a Diffrax solver. ODE: Euler, Heun, Midpoint, Ralston, Bosh3, Tsit5, Dopri5,
      Dopri8. SDE: Euler (Euler-Maruyama), Heun, SRA1, ShARK, SEA.
    - `steps`: a fixed uniform grid of this many steps; exclusive with `rtol`/`atol`.
    - `rtol`, `atol`: tolerances of an adaptive PID-controlled solve (default 1e-5 each, 1e-3
      for an SDE, when `steps` is not given and the solver has an error estimate).
    - `sde`: solve the generative SDE dz = f_hat dt + g(t) dw_bar instead of the ODE.
    - `max_steps`: running out is a `RuntimeError` that names the fix.
    - `brownian_tol`: resolution of the virtual Brownian tree of an adaptive SDE solve (a fixed
      grid draws one increment per step instead).
    - `per_example`: solve each sample on its own (vmapped) instead of one solve whose adaptive
      step size serves the whole batch.
    - `mesh`: a `data_mesh()` to spread the samples over its devices; each device solves its
      own rows (no cross-device communication inside a solve).
    - `num_chunks`: split the samples into this many independent solves (default: one per
      device of `mesh`, else 1). With a mesh it must be a multiple of the device count; the
      results depend on the chunking but not on the devices (a one-device run with the same
      `num_chunks` gives the same samples). Chunk i's Brownian motion is drawn from
      `fold_in(key, i)`; the initial noise is the same for every chunking.
    - `context`: for a conditional model, the one context (a class label or a vector) all
      samples are drawn under: the same as sampling `model.conditioned(context)`.

    **Returns:** `(samples, stats)`; samples are z_0, the model's t = 0 marginal (data + delta
    noise, the mean of the decoder N(x; z_0, delta^2 I)), in the model's units.
    """
    settings = _settings(solver, steps, rtol, atol, max_steps, sde, num)
    model = _conditioned(model, context)
    num_chunks = resolve_chunks(num, mesh, num_chunks, "`num`")
    # One device: the plain solve (bit-identical to no mesh at all).
    mesh = None if mesh is None or mesh_size(mesh) == 1 else mesh
    saveat = dfx.SaveAt(t1=True)
    ys, stats = _timed_solve(
        model, key, num, solver, settings, sde, brownian_tol, saveat, per_example, num_chunks, mesh
    )
    return ys[0], stats


def sample_trajectories(
    model: NFDM,
    num: int,
    *,
    key: Key,
    num_points: int = 65,
    solver: dfx.AbstractSolver = dfx.Tsit5(),
    steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    sde: bool = False,
    max_steps: int = 4096,
    brownian_tol: float = 1e-3,
    context: Context | None = None,
) -> tuple[Float[Array, " points"], Float[Array, " points num *shape"], SolveStats]:
    """Like `sample`, but also returns the path at `num_points` times from t = 1 down to t = 0.

    Returns `(t, z_t, stats)` with `t` decreasing from 1 to 0 and `z_t[-1]` the samples.
    Solver settings as in `sample`; adaptive solves interpolate the saved points (dense output).
    """
    if not (isinstance(num_points, int) and num_points >= 2):
        raise ValueError(f"`num_points` must be an integer >= 2; got {num_points!r}.")
    settings = _settings(solver, steps, rtol, atol, max_steps, sde, num)
    model = _conditioned(model, context)
    s = jnp.linspace(0.0, 1.0, num_points)
    saveat = dfx.SaveAt(ts=s)
    ys, stats = _timed_solve(model, key, num, solver, settings, sde, brownian_tol, saveat, False)
    return 1 - s, ys, stats
