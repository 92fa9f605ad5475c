"""Exact-trace ODE NLL of 5,000 2-D points: one adaptive solve over the whole batch versus a
vmapped solve per example (rtol = atol = 1e-5, Dopri5). Prints a Markdown table.

    PYTHONPATH=$PWD python benchmarks/nll_batching.py [--num 5000] [--repeats 2]

The model is a small random NFDM (learnable Gaussian forward process perturbed away from its
zero initialisation, MLP predictor, width 64, depth 2): its dynamics are as irregular as a
trained model's, which is what matters for step-size control. Timings exclude compilation (each
variant is run once on the same shapes first) and are the best of `--repeats` runs.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

import nfdm_de as nd


def random_model(key):
    k1, k2, k3 = jr.split(key, 3)
    forward = nd.neural_gaussian(2, width=64, depth=2, key=k1)
    params, static = eqx.partition(forward, eqx.is_inexact_array)
    leaves, treedef = jtu.tree_flatten(params)
    keys = jr.split(k3, len(leaves))
    leaves = [p + 0.1 * jr.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)]
    forward = eqx.combine(jtu.tree_unflatten(treedef, leaves), static)
    predictor = nd.mlp_predictor(2, width=64, depth=2, key=k2)
    return nd.NFDM(forward, predictor, nd.ZeroVolatility())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = random_model(jr.key(0))
    # Two lobes: normal points shifted left or right by the sign of their second coordinate.
    x = jr.normal(jr.key(1), (args.num, 2))
    x = x.at[:, 0].add(jnp.sign(x[:, 1]))
    rows = []
    results = {}
    for label, per_example in (("one solve over the batch", False), ("vmap per example", True)):
        nd.log_likelihood(model, x, rtol=1e-5, atol=1e-5, per_example=per_example)  # compile
        best = None
        for _ in range(args.repeats):
            start = time.perf_counter()
            est, stats = nd.log_likelihood(model, x, rtol=1e-5, atol=1e-5, per_example=per_example)
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        results[per_example] = est.value
        rows.append(
            f"| {label} | {best:.2f} | {stats.nfe:.1f} | {stats.nfe_max} | "
            f"{float(jnp.mean(-est.value)):.5f} |"
        )
    difference = float(jnp.max(jnp.abs(results[True] - results[False])))
    device = jax.devices()[0]
    print(f"Exact-trace NLL, {args.num} 2-D points, Dopri5, rtol = atol = 1e-5, on {device}:\n")
    print("| variant | seconds | NFE per example (mean) | NFE (max) | mean NLL (nats) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nLargest per-example difference between the two: {difference:.2e} nats.")


if __name__ == "__main__":
    main()
