"""Shared pieces of the density benchmarks (`density.py`, `peers.py`): train an nfdm-de
configuration through the library's own train loop, and measure held-out NLL gaps to the truth.

All NLLs are in nats per example in the data's own units; the *gap* is model NLL minus the true
NLL of the same held-out points (the KL divergence from the truth plus Monte Carlo noise), so
0 is perfect and smaller is better.
"""

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd

# Known-density toy sets used by default (sharp edges, thin curves, multimodal, dimension 10).
DEFAULT_SETS = ("checkerboard", "spirals", "two-moons", "rings", "eight-gaussians", "gmm-10d")

# name -> (flat settings for nd.update_config, which NLLs to report)
NFDM_METHODS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "nfdm": ({"forward": "neural-gaussian", "volatility": "learned"}, ("bound", "ode")),
    "nfdm-ot": (
        {
            "forward": "neural-gaussian",
            "volatility": "zero",
            "curvature": 1.0,
            "forward_anchor": "linear",
        },
        ("ode",),
    ),
    # NFDM with its forward network frozen at zero: only the anchor weight w is learned, so the
    # path is a learned, data-independent mixture of the linear and VP paths.
    "learned-anchor": (
        {"forward": "neural-gaussian", "volatility": "learned", "forward_network_lr_scale": 0.0},
        ("bound", "ode"),
    ),
    "vp": ({"forward": "vp", "volatility": "learned"}, ("bound", "ode")),
    "learned-schedule": (
        {"forward": "learned-schedule", "volatility": "learned"},
        ("bound", "ode"),
    ),
    "linear": ({"forward": "linear", "volatility": "learned"}, ("bound", "ode")),
    "flow-matching": ({"forward": "linear", "volatility": "zero"}, ("ode",)),
}


@dataclasses.dataclass
class Budget:
    steps: int
    batch: int
    width: int
    depth: int
    lr: float | None = None  # None: the library default (OptimConfig.lr)
    seed: int = 0


def budget_parser(doc: str | None, *, sets: str, methods: str) -> argparse.ArgumentParser:
    """The flags both density benchmarks share: the training budget, the held-out size, the
    sets and methods to run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    # The defaults are `nfdm-de train`'s own simulation-free budget.
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak lr (default: the library default)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--sets", default=sets)
    parser.add_argument("--methods", default=methods)
    parser.add_argument(
        "--likelihood-steps",
        type=int,
        default=0,
        help="also report each nfdm-de method after this many likelihood-phase steps (+ml)",
    )
    parser.add_argument("--jsonl", default=None, help="also append each result to this file")
    parser.add_argument(
        "--bound-samples",
        type=int,
        default=128,
        help="(t, eps) pairs per held-out point for the bound (its Monte Carlo s.e. ~ 1/sqrt)",
    )
    return parser


def true_nll(name: str, x: np.ndarray) -> np.ndarray:
    """-log p_true(x) per example (data units)."""
    dataset = nd.get_dataset(name)
    log_prob = jax.jit(jax.vmap(dataset.log_prob))(jnp.asarray(x, jnp.result_type(float)))
    return -np.asarray(log_prob, np.float64)


def test_points(name: str, num: int) -> np.ndarray:
    return nd.load_dataset(name, split="test", num=num)


def _config(name: str, settings: dict, budget: Budget, extra: dict | None) -> "nd.TrainConfig":
    """The TrainConfig of one benchmark run: the budget, then the method's settings."""
    flat = {
        "data": name,
        "steps": budget.steps,
        "batch_size": budget.batch,
        "width": budget.width,
        "depth": budget.depth,
        "seed": budget.seed,
        **({} if budget.lr is None else {"lr": budget.lr}),
        "save_every": budget.steps,
        "log_every": max(budget.steps // 10, 1),
        "warmup": min(200, budget.steps // 10),
        # The simulation-free objective only: a likelihood phase is run (and reported) apart,
        # by `train_nfdm_with_phase` / `--likelihood-steps`.
        "likelihood_steps": 0,
        **settings,
        **(extra or {}),
    }
    return nd.update_config(nd.TrainConfig(), flat)


def train_nfdm(name: str, settings: dict, budget: Budget, extra: dict | None = None):
    """Train with `nd.train` in a temporary run directory; returns (LoadedRun, seconds)."""
    with tempfile.TemporaryDirectory() as run_dir:
        result = nd.train(_config(name, settings, budget, extra), run_dir)
        run = nd.load_run(run_dir)
    return run, result.seconds


def train_nfdm_with_phase(
    name: str, settings: dict, budget: Budget, likelihood_steps: int, extra: dict | None = None
):
    """Train with `nd.train`, then resume the finished run with a likelihood phase of
    `likelihood_steps` steps (the same run, so the first phase is shared). Yields
    (label, LoadedRun, cumulative training seconds): ("", base) then ("+ml", fine-tuned)."""
    config = _config(name, settings, budget, extra)
    with tempfile.TemporaryDirectory() as run_dir:
        first = nd.train(config, run_dir)
        yield "", nd.load_run(run_dir), first.seconds
        if likelihood_steps > 0:
            tuned = nd.update_config(
                config, {"likelihood_steps": likelihood_steps, "save_every": likelihood_steps}
            )
            second = nd.train(tuned, run_dir, resume=True)
            yield "+ml", nd.load_run(run_dir), first.seconds + second.seconds


def steady_rate(name: str, settings: dict, budget: Budget, probe_steps: int = 200) -> float:
    """Steady-state training steps/s of a configuration (a short probe run; compile excluded)."""
    flat = {
        "data": name,
        "steps": probe_steps,
        "batch_size": budget.batch,
        "width": budget.width,
        "depth": budget.depth,
        "seed": budget.seed,
        "num_train": 10_000,
        "log_every": probe_steps // 2,
        "likelihood_steps": 0,
        **settings,
    }
    config = nd.update_config(nd.TrainConfig(), flat)
    with tempfile.TemporaryDirectory() as run_dir:
        nd.train(config, run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    return float(records[-1]["steps_per_sec"])


def nfdm_nll(
    run, x: np.ndarray, which, *, seed: int = 0, rtol: float = 1e-5, bound_samples: int = 128
):
    """{"bound": per-example NLL, "ode": per-example NLL, "<m>_seconds": seconds} (data units)."""
    out = {}
    log_jacobian = float(run.transform.log_det())
    z = run.transform.to_model(jnp.asarray(x, jnp.result_type(float)))
    key = jr.key(seed)
    if "ode" in which:
        start = time.perf_counter()
        estimate, _ = nd.log_likelihood(run.model, z, trace=nd.ExactTrace(), rtol=rtol, atol=rtol)
        out["ode"] = -(np.asarray(estimate.value, np.float64) + log_jacobian)
        out["ode_seconds"] = time.perf_counter() - start
    if "bound" in which and not run.model.is_deterministic:
        start = time.perf_counter()
        # Importance-sampled t (power 3), as `nfdm-de nll` does: the same bound, about half
        # the standard error of uniform t.
        estimate, _ = nd.variational_bound(
            run.model, z, key=key, num_samples=bound_samples, time_power=3.0
        )
        out["bound"] = np.asarray(estimate.value, np.float64) - log_jacobian
        out["bound_seconds"] = time.perf_counter() - start
    return out


def gap(nll: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Mean gap and its standard error (paired over the same held-out points)."""
    d = np.asarray(nll) - np.asarray(truth)
    d = d[np.isfinite(d)] if np.isfinite(d).any() else d
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d)))


def fmt(value: float | None, stderr: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if stderr is None:
        return f"{value:.3f}"
    return f"{value:.3f} ± {stderr:.3f}"
