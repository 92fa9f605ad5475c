"""Few-step sampling: energy distance at 1, 2 and 4 Euler steps for NFDM-OT against the baselines.

    python benchmarks/few_step.py [--data two-moons] [--steps 3000] [--lams 1,2]
                                  [--run-root runs/solver_ablation]

Models (trained with `nfdm_de.train`, or loaded from `<run-root>/<name>` when already there; the
names and settings are those of `examples/solver_ablation.py`, so its runs are reused):

- `nfdm-ot`: learnable forward process, `volatility=zero`, curvature weight lambda (one run per
  value of `--lams`; `nfdm-ot` for the first, `nfdm-ot-lam<value>` for the others);
- `linear`: linear-interpolant flow matching (`volatility=zero`);
- `nfdm`: the stochastic NFDM (learned volatility), sampled with its probability-flow ODE.

Every model is sampled with Euler at 1, 2 and 4 steps (the linear baseline also at 8; the target
is NFDM-OT at 2 steps beating it) from the same noise, and with adaptive Tsit5 (tolerance 1e-4)
as each model's own quality floor; energy distance to held-out data, averaged over `--repeats`
repeats (mean +- standard error), each with its own noise seed *and* its own held-out draw, so the
error bar covers the test set's randomness as well as the sampler's. Every model sees the same
noise and held-out points in a given repeat. Prints a Markdown table.
"""

import argparse
import dataclasses
import os
import sys

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from solver_ablation import model_configs, train_or_load  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="two-moons")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--lams", default="1,2", help="comma-separated curvature weights")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default=os.path.join("runs", "solver_ablation"))
    args = parser.parse_args()
    args.smoke = False

    lams = [float(v) for v in args.lams.split(",")]
    base = model_configs(lams[0])
    models = {}
    for i, lam in enumerate(lams):
        name = "nfdm-ot" if i == 0 else f"nfdm-ot-lam{lam:g}"
        models[(name, lam)] = dataclasses.replace(base["nfdm-ot"], curvature=lam)
    models[("linear", None)] = base["linear"]
    models[("nfdm", None)] = base["nfdm"]
    # One held-out draw per repeat (seeds args.seed, args.seed + 1, ...), shared by all models.
    held_out = [
        nd.load_dataset(args.data, split="test", num=args.num_samples, seed=args.seed + r)
        for r in range(args.repeats)
    ]

    rows, per_repeat = [], {}
    for (name, lam), config in models.items():
        run = train_or_load(name, config, args)
        counts = (1, 2, 4, 8) if name == "linear" else (1, 2, 4)
        # The last row per model: adaptive Tsit5 at tolerance 1e-4, the model's own quality floor
        # (what few-step sampling can at best approach).
        for steps in (*counts, None):
            values = []
            for r in range(args.repeats):
                solver = dfx.Euler() if steps is not None else dfx.Tsit5()
                tol = None if steps is not None else 1e-4
                z, stats = nd.sample(
                    run.model,
                    args.num_samples,
                    key=jr.key(1000 + r),
                    solver=solver,
                    steps=steps,
                    rtol=tol,
                    atol=tol,
                )
                x = np.asarray(run.transform.from_model(z))
                values.append(float(nd.energy_distance(x, held_out[r])))
            per_repeat[(name, steps)] = np.asarray(values)
            rows.append((name, lam, steps, stats.nfe, *mean_se(values)))
    print(
        f"\n{args.data}, {args.steps} training steps per model, {args.num_samples} samples vs "
        f"{args.num_samples} held-out points, mean +- s.e. over {args.repeats} repeats (noise seed "
        f"and held-out draw)\n"
    )
    print("| model | lambda | Euler steps | NFE | energy distance |")
    print("|---|---:|---:|---:|---:|")
    for name, lam, steps, nfe, mean, se in rows:
        lam_text = "—" if lam is None else f"{lam:g}"
        steps_text = "Tsit5 tol 1e-4" if steps is None else f"{steps}"
        print(f"| {name} | {lam_text} | {steps_text} | {nfe:.0f} | {mean:.4f} ± {se:.4f} |")
    # The target as a paired comparison: same noise and held-out draw in each repeat, so the
    # difference's error bar is not inflated by what the two share.
    print("\n| target: NFDM-OT at 2 steps minus linear at 8 | lambda | difference |")
    print("|---|---:|---:|")
    for name, lam in models:
        if lam is not None:
            diff = per_repeat[(name, 2)] - per_repeat[("linear", 8)]
            mean, se = mean_se(diff)
            if mean + 2 * se < 0:
                verdict = "beats"
            elif mean - 2 * se > 0:
                verdict = "loses"
            else:
                verdict = "tie (within 2 s.e.)"
            print(f"| {name}: {verdict} | {lam:g} | {mean:+.4f} ± {se:.4f} |")


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values)
    return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values)))


if __name__ == "__main__":
    jnp.zeros(())
    main()
