"""Shared fixtures. Identities are checked in float64 (docs/math.md, "Accuracy checks"); the
suite runs on CPU."""

import itertools
import os
from pathlib import Path

# A persistent XLA compilation cache shared by the test process, its xdist workers and the CLI
# subprocesses the tests launch (they inherit the environment): the suite compiles the same
# small training steps and solves many times over, and compilation dominates its run time.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# Most of the suite's time is XLA compiling programs that then run for well under a second, so
# the CPU backend compiles with less optimisation: LLVM at -O0 and the classic (non-MLIR) fusion
# emitters cut the compile time of a train step or an ODE solve with its gradient by a third.
# The results are the same programs' results; only their speed differs. Added to any flags the
# environment already sets.
os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} "
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
).strip()
# Strict dtype promotion, as Diffrax and Equinox test: mixing two concrete dtypes is an error, so
# an implicit float32 * float64 in the library fails here instead of silently promoting (users
# may run strict too). Python scalars stay weakly typed and are allowed. The environment carries
# it to the CLI, example and benchmark subprocesses the tests launch.
os.environ["JAX_NUMPY_DTYPE_PROMOTION"] = "strict"

import jax  # noqa: E402
import jax.random as jr
import pytest

# The suite is single-process: a batch job's cluster variables around it (a SLURM step, Open
# MPI) would make `nfdm-de train` join that job through JAX's cluster detection. The
# multi-process tests set their own.
for _name in [n for n in os.environ if n.startswith(("SLURM_", "OMPI_"))]:
    del os.environ[_name]

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", os.environ["JAX_NUMPY_DTYPE_PROMOTION"])


@pytest.fixture
def getkey():
    """A fresh PRNG key on every call, deterministic per test."""
    counter = itertools.count()
    base = jr.key(0)
    return lambda: jr.fold_in(base, next(counter))
