"""Data parallelism with JAX's own machinery: a one-axis `Mesh` over every device, batches split
along it, everything else replicated, and `jax.distributed` for several processes.

- Training: the jitted train step is unchanged. Its batch is a global `jax.Array` sharded as
  `P("data")` and its state is replicated, so XLA partitions the step and inserts the gradient
  all-reduce itself. On one device the mesh has one device and nothing changes.
- Several processes: each process builds only its own rows of every global batch (see
  `process_rows`) and `shard_batch` assembles the global array with
  `jax.make_array_from_process_local_data`. The global batch is the single-process batch, so
  the loss trajectory is the single-process one.
- Evaluation (sampling, likelihood): an adaptive solve over a batch chooses one step size for
  the whole batch, and its loop condition would be a cross-device reduction on every step if
  the batch were simply sharded. `map_chunks` instead makes every device's rows their own
  independent solve (`jax.shard_map` over the data axis; inside, a `vmap` over that device's
  chunks). The result equals a single-device run with the same number of chunks.
"""

import os
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables read by `initialize_distributed` when no flag is given.
COORDINATOR_ENV = "NFDM_DE_COORDINATOR"
NUM_PROCESSES_ENV = "NFDM_DE_NUM_PROCESSES"
PROCESS_ID_ENV = "NFDM_DE_PROCESS_ID"


# --- processes ----------------------------------------------------------------------------------


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run through `jax.distributed.initialize`, before any JAX work.

    Settings come from the arguments, else from `NFDM_DE_COORDINATOR` (host:port of process
    0), `NFDM_DE_NUM_PROCESSES` and `NFDM_DE_PROCESS_ID`. With none of them,
    `jax.distributed.initialize()` is called without arguments, so that JAX detects a cluster
    it knows (a SLURM step started by `srun`, Open MPI, Kubernetes, Cloud TPU; docs/training.md,
    "Scaling out"); where it detects none, nothing happens (a single process). On CPU the
    cross-process collectives use gloo. Returns whether this process is part of a
    multi-process run.
    """

    def from_env(value, name, convert):
        if value is not None:
            return value
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return None
        try:
            return convert(raw)
        except ValueError:
            raise ValueError(
                f"environment variable {name} must be an integer; got {raw!r}."
            ) from None

    coordinator = from_env(coordinator, COORDINATOR_ENV, str)
    num_processes = from_env(num_processes, NUM_PROCESSES_ENV, int)
    process_id = from_env(process_id, PROCESS_ID_ENV, int)
    given = {
        "coordinator": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    if all(v is None for v in given.values()):
        return _join_detected_cluster()
    missing = [name for name, v in given.items() if v is None]
    if missing:
        raise ValueError(
            "a multi-process run needs the coordinator address, the process count and this "
            f"process's id; missing: {', '.join(missing)} (flags --coordinator, "
            f"--num-processes, --process-id or ${COORDINATOR_ENV}, ${NUM_PROCESSES_ENV}, "
            f"${PROCESS_ID_ENV})."
        )
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"the process count must be a positive integer; got {num_processes!r}.")
    if not (isinstance(process_id, int) and 0 <= process_id < num_processes):
        raise ValueError(f"the process id must be in [0, {num_processes}); got {process_id!r}.")
    if not (isinstance(coordinator, str) and ":" in coordinator):
        raise ValueError(f"the coordinator address must be host:port; got {coordinator!r}.")
    if num_processes == 1:
        return False
    # Must precede the backend's creation; harmless for GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True


def _join_detected_cluster() -> bool:
    """`jax.distributed.initialize()` with JAX's cluster detection; False where it finds none.

    Once JAX has started in this process (any computation, a device query) it can no longer
    join a cluster: the process then runs as what it already is (one process, unless an
    earlier call joined one)."""
    try:
        jax.distributed.initialize()
    except ValueError:  # no cluster environment: JAX asks for a coordinator address
        return False
    except RuntimeError:  # JAX already started here, or the process already joined
        return jax.process_count() > 1
    # Before the backend is created (the first device query): gloo for CPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return jax.process_count() > 1


def is_main_process() -> bool:
    """Whether this process writes checkpoints, metrics and logs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --- the mesh -----------------------------------------------------------------------------------


def data_mesh(devices: Any = None) -> Mesh:
    """A one-axis mesh named `"data"` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("a data mesh needs at least one device.")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_size(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    """A batch that does not split evenly over the devices is an error, not a silent change."""
    devices = mesh_size(mesh)
    if size % devices != 0:
        raise ValueError(
            f"{what} {size} does not divide evenly over {devices} devices; use a multiple of "
            f"{devices} (e.g. {max(devices, size - size % devices)})."
        )


def process_rows(batch_size: int, mesh: Mesh) -> slice:
    """The rows of each global batch that this process supplies (its devices' rows)."""
    check_divisible(batch_size, mesh, "the global batch size")
    processes = jax.process_count()
    if batch_size % processes != 0:
        raise ValueError(
            f"the global batch size {batch_size} does not divide evenly over {processes} processes."
        )
    # A mesh from `data_mesh` lists devices process by process, so process p owns the p-th block.
    owners = [d.process_index for d in mesh.devices.flat]
    if owners != sorted(owners):
        raise ValueError("the data mesh must list devices grouped by process.")
    per_process = batch_size // processes
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


# --- placing arrays -----------------------------------------------------------------------------


def replicate(tree, mesh: Mesh):
    """Every array leaf of `tree` (identical on every process) as a replicated global array."""
    sharding = NamedSharding(mesh, P())

    def put(leaf):
        if not eqx.is_array(leaf):
            return leaf
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            raise ValueError("replicate raw key data (jr.key_data), not typed keys.")
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def shard_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of a global batch -> the global batch sharded over `"data"`."""
    local = np.asarray(local)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    global_rows = local.shape[0] * jax.process_count()
    check_divisible(global_rows, mesh, "the global batch size")
    return jax.make_array_from_process_local_data(sharding, local, (global_rows, *local.shape[1:]))


# --- independent solves per device --------------------------------------------------------------


def map_chunks(
    fn: Callable[..., Any],
    batched: Any,
    shared: Any,
    *,
    num_chunks: int,
    mesh: Mesh | None,
) -> Any:
    """`fn(batched_chunk, shared, chunk_index)` on `num_chunks` contiguous chunks of `batched`.

    Every array leaf of `batched` is split along its leading axis; `shared` is passed whole.
    Each chunk is an independent computation (an independent adaptive solve), and every leaf of
    the output gains a leading axis of length `num_chunks`.

    Without a mesh (or on a one-device mesh) the chunks are `vmap`ped on one device. On a mesh,
    `jax.shard_map` gives every device its `num_chunks / devices` chunks, which it `vmap`s on its
    own: no collective runs during a solve, and a device whose chunks finish early does not wait
    for the others until the results are gathered. The values are the same either way.
    """
    leaves = jax.tree.leaves(batched)
    rows = leaves[0].shape[0]
    if rows % num_chunks != 0:
        raise ValueError(f"{rows} examples do not split into {num_chunks} equal chunks.")

    def split(tree):
        return jax.tree.map(lambda a: a.reshape(num_chunks, -1, *a.shape[1:]), tree)

    chunked = split(batched)
    index = jnp.arange(num_chunks)
    shared_dynamic, shared_static = eqx.partition(shared, eqx.is_array)

    def local(chunks, chunk_index, dynamic):
        whole = eqx.combine(dynamic, shared_static)
        return jax.vmap(lambda c, i: fn(c, whole, i))(chunks, chunk_index)

    if mesh is None or mesh_size(mesh) == 1:
        return local(chunked, index, shared_dynamic)
    if num_chunks % mesh_size(mesh) != 0:
        raise ValueError(
            f"{num_chunks} independent solves do not divide evenly over {mesh_size(mesh)} devices."
        )
    spec = P(DATA_AXIS)
    constrain = jax.lax.with_sharding_constraint
    chunked = jax.tree.map(lambda a: constrain(a, NamedSharding(mesh, spec)), chunked)
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(spec, spec, P()),
        out_specs=spec,
        # The solve's while loops and Diffrax internals are not annotated for varying-manual-axes
        # checks; every output is per-device data along `"data"` by construction.
        check_vma=False,
    )
    out = mapped(chunked, index, shared_dynamic)
    # Gather to every device: callers read the results on the host (on every process).
    return jax.tree.map(lambda a: constrain(a, NamedSharding(mesh, P())), out)


def resolve_chunks(num: int, mesh: Mesh | None, num_chunks: int | None, what: str) -> int:
    """The number of independent solves for `num` examples: `num_chunks`, else one per device."""
    devices = 1 if mesh is None else mesh_size(mesh)
    chunks = devices if num_chunks is None else num_chunks
    if isinstance(chunks, bool) or not (isinstance(chunks, int) and chunks >= 1):
        raise ValueError(f"`num_chunks` must be a positive integer; got {num_chunks!r}.")
    if chunks % devices != 0:
        raise ValueError(
            f"`num_chunks` ({chunks}) must be a multiple of the {devices} devices of the mesh."
        )
    if num % chunks != 0:
        raise ValueError(
            f"{what} {num} does not split into {chunks} equal independent solves (one or more "
            f"per device); use a multiple of {chunks}."
        )
    return chunks
