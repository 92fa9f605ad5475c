"""Held-out NLL of the non-Gaussian forward process (`neural-flow`) against the Gaussian NFDM
(`neural-gaussian`) on the built-in 2-D sets whose true density is known.

For every dataset both models are trained by `nd.train` with the same `TrainConfig` except the
forward process (same predictor, volatility, steps, batch, learning rate and seed). On a held-out
split (`nd.load_dataset(name, split="test")`, a random stream separate from training) we report

- the variational bound (`nd.variational_bound`, the quantity training minimises) and
- the probability-flow ODE NLL (`nd.log_likelihood`, exact trace, fixed-step Tsit5),

both in data units (model-space NLL minus `transform.log_det()`), as gaps to the true NLL
-mean log p(x) of the same points (`nd.get_dataset(name).log_prob`), so 0 is perfect. The train
step cost ratio is the median steps/s of the runs' own logged intervals (the first interval,
which includes compilation, is dropped), i.e. the real train loop on the same machine.

    python benchmarks/flow_density.py [--steps 1500] [--num-test 1000] [--datasets ...]

Prints a Markdown table on stdout, progress on stderr.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd

DATASETS = ("eight-gaussians", "checkerboard", "two-moons", "spirals", "rings")
FORWARDS = (nd.ForwardChoice.NEURAL_GAUSSIAN, nd.ForwardChoice.NEURAL_FLOW)


def _steps_per_second(run_dir: str) -> float:
    with open(os.path.join(run_dir, nd._train._run_dir.METRICS_FILE)) as f:
        records = [json.loads(line) for line in f]
    rates = [r["steps_per_sec"] for r in records[1:]] or [records[-1]["steps_per_sec"]]
    return statistics.median(rates)


def _evaluate(run_dir: str, name: str, x: np.ndarray, args) -> dict:
    run = nd.load_run(run_dir)
    z = run.transform.to_model(jnp.asarray(x, jnp.result_type(float)))
    log_det = float(run.transform.log_det())
    bound, _ = nd.variational_bound(run.model, z, key=jr.key(1), num_samples=args.bound_samples)
    ode, _ = nd.log_likelihood(run.model, z, solver=dfx.Tsit5(), steps=args.ode_steps)
    return {
        "bound": float(jnp.mean(bound.value)) - log_det,
        "bound_se": float(jnp.std(bound.value) / np.sqrt(len(x))),
        "ode": -float(jnp.mean(ode.value)) - log_det,
        "ode_se": float(jnp.std(ode.value) / np.sqrt(len(x))),
        "steps_per_sec": _steps_per_second(run_dir),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--bound-samples", type=int, default=16)
    parser.add_argument("--ode-steps", type=int, default=32)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()

    root = args.out or tempfile.mkdtemp(prefix="flow_density_")
    rows = []
    started = time.perf_counter()
    for name in args.datasets:
        x = nd.load_dataset(name, split="test", num=args.num_test)
        true_nll = -float(np.mean(jax.vmap(nd.get_dataset(name).log_prob)(jnp.asarray(x))))
        result = {}
        for forward in FORWARDS:
            config = nd.TrainConfig(
                data=name,
                steps=args.steps,
                batch_size=args.batch_size,
                save_every=args.steps,
                log_every=max(args.steps // 10, 1),
                model=nd.ModelConfig(forward=forward),
                # The two forward processes as the simulation-free objective trains them.
                likelihood_steps=0,
            )
            run_dir = os.path.join(root, f"{name}-{forward.value}")
            t0 = time.perf_counter()
            nd.train(config, run_dir)
            result[forward] = _evaluate(run_dir, name, x, args)
            print(
                f"{name} {forward.value}: {result[forward]} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        rows.append((name, true_nll, result))

    gaussian, flow = FORWARDS
    print(
        f"Held-out NLL (nats, data units) on {args.num_test} test points; both models trained "
        f"{args.steps} steps, batch {args.batch_size}, default TrainConfig otherwise (predictor "
        f"128x3, learned g, lr 1e-3 cosine); bound: {args.bound_samples} (t, eps) pairs per "
        f"point; ODE: Tsit5, {args.ode_steps} fixed steps, exact trace; {jax.devices()[0].platform}"
        f", float32; total {time.perf_counter() - started:.0f} s.\n"
    )
    print(
        "| data | true NLL | gaussian: bound gap | gaussian: ODE gap | flow: bound gap "
        "| flow: ODE gap | step cost flow/gaussian |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, true_nll, r in rows:
        g, f = r[gaussian], r[flow]
        print(
            f"| {name} | {true_nll:.3f} "
            f"| {g['bound'] - true_nll:+.3f} ± {g['bound_se']:.3f} "
            f"| {g['ode'] - true_nll:+.3f} ± {g['ode_se']:.3f} "
            f"| {f['bound'] - true_nll:+.3f} ± {f['bound_se']:.3f} "
            f"| {f['ode'] - true_nll:+.3f} ± {f['ode_se']:.3f} "
            f"| {g['steps_per_sec'] / f['steps_per_sec']:.2f}x |"
        )
    print(
        "\n± is the standard error over test points of each estimate (the gaps share the same "
        "points, so differences between columns are measured more precisely than ± suggests)."
    )


if __name__ == "__main__":
    main()
