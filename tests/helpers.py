"""Test helpers: a table of every forward process, perturbation, and tolerance policy."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

import nfdm_de as nd

# Tolerance policy (STYLE.md): float64 identities, finite differences.
IDENTITY_TOL = 1e-8
FINITE_DIFFERENCE_TOL = 1e-4

DATA_SIZE = 3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run `benchmarks/<script>` as a user would (from the benchmarks folder, with the repository
    importable), capturing its output."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *args],
        capture_output=True,
        text=True,
        cwd=os.path.join(ROOT, "benchmarks"),
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=600,
    )


def perturb(module, key, scale=0.3):
    """Add noise to every inexact array so zero-initialised corrections are not trivially zero."""
    params, static = eqx.partition(module, eqx.is_inexact_array)
    leaves, treedef = jtu.tree_flatten(params)
    keys = jr.split(key, len(leaves))
    leaves = [
        leaf + scale * jr.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return eqx.combine(jtu.tree_unflatten(treedef, leaves), static)


class GenericPath(nd.AbstractForwardProcess):
    """A user-style subclass defining only F, F^{-1} and the log-determinant, delegating to a
    Gaussian process: its velocity and score come from the base class's autodiff path."""

    inner: nd.AbstractGaussianForwardProcess
    delta: float

    def __init__(self, inner):
        self.inner = inner
        self.delta = inner.delta

    def transform(self, eps, t, x):
        return self.inner.transform(eps, t, x)

    def inverse(self, z, t, x):
        return self.inner.inverse(z, t, x)

    def log_det_inverse(self, z, t, x):
        return self.inner.log_det_inverse(z, t, x)


def forward_processes(key):
    """Every built-in forward process, learnable ones perturbed away from initialisation."""
    k1, k2, k3, k4, k5, k6 = jr.split(key, 6)
    k7, k8 = jr.split(jr.fold_in(key, 7))
    neural = perturb(nd.neural_gaussian(DATA_SIZE, width=16, depth=2, key=k1), k2)
    neural_vp = perturb(
        nd.neural_gaussian(
            DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.VP, input_octaves=2, key=k7
        ),
        k8,
    )
    k9, k10 = jr.split(jr.fold_in(key, 9))
    neural_mixed = perturb(
        nd.neural_gaussian(DATA_SIZE, width=16, depth=2, anchor=nd.AnchorChoice.MIXED, key=k9), k10
    )
    schedule = perturb(nd.LearnedSchedule(hidden=8, key=k3), k4, scale=1.0)
    flow = perturb(
        nd.neural_flow(DATA_SIZE, width=16, depth=1, num_layers=3, unroll=False, key=k5), k6
    )
    return {
        "neural-gaussian": neural,
        "neural-gaussian(vp anchor)": neural_vp,
        "neural-gaussian(mixed anchor)": neural_mixed,
        "linear": nd.LinearInterpolant(),
        "vp": nd.VariancePreserving(delta=0.05),
        "learned-schedule": schedule,
        "generic(neural-gaussian)": GenericPath(neural),
        "neural-flow": flow,
    }


FORWARD_NAMES = [
    "neural-gaussian",
    "neural-gaussian(vp anchor)",
    "neural-gaussian(mixed anchor)",
    "linear",
    "vp",
    "learned-schedule",
    "generic(neural-gaussian)",
    "neural-flow",
]


def max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


def as_f64(tree):
    return jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)
