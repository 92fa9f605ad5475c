"""Generative trajectories of NFDM-OT beside the linear-interpolant baseline's.

    python examples/straight_trajectories.py [--data two-moons] [--steps 1500] [--lam 0.1]
                                             [--run-root runs/solver_ablation] [--plot out.png]

Trains (or loads, from the same run directories as `solver_ablation.py`) NFDM-OT
(`volatility=zero`, learnable forward process, curvature penalty `--lam`) and the linear
baseline, draws ODE paths from t = 1 to t = 0 with `nfdm_de.sample_trajectories`, plots them side
by side, and prints a straightness figure per model: (total path length / total distance between
the endpoints) - 1, which is zero for straight paths.
"""

import argparse
import os
import sys

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from solver_ablation import model_configs, train_or_load  # noqa: E402


def excess_length(paths: np.ndarray) -> float:
    """sum of path lengths / sum of |end - start| - 1 (a ratio of sums, so that the few paths
    whose ends nearly coincide do not dominate); paths: (points, num, D)."""
    length = np.sum(np.linalg.norm(np.diff(paths, axis=0), axis=-1), axis=0)
    chord = np.linalg.norm(paths[-1] - paths[0], axis=-1)
    return float(np.sum(length) / max(float(np.sum(chord)), 1e-12) - 1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="two-moons")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--lam", type=float, default=0.1)
    parser.add_argument("--num-paths", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default=os.path.join("runs", "solver_ablation"))
    parser.add_argument("--plot", default="straight_trajectories.png")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size, args.num_train, args.num_paths = 30, 64, 512, 50

    configs = model_configs(args.lam)
    panels = []
    for name in ("nfdm-ot", "linear"):
        config = configs[name]
        if args.smoke:
            import dataclasses

            config = dataclasses.replace(
                config, width=16, depth=1, forward_width=16, forward_depth=1
            )
        run = train_or_load(name, config, args)
        steps = 8 if args.smoke else None  # adaptive Tsit5 with dense output by default
        t, z, stats = nd.sample_trajectories(
            run.model, args.num_paths, key=jr.key(args.seed + 1), num_points=33, steps=steps
        )
        paths = np.asarray(run.transform.from_model(z))
        print(
            f"{name}: excess path length {excess_length(paths):.4f} "
            f"(0 = straight), NFE {stats.nfe:.0f}"
        )
        panels.append((name, paths))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), sharex=True, sharey=True)
    for ax, (name, paths) in zip(axes, panels, strict=True):
        for i in range(paths.shape[1]):
            ax.plot(paths[:, i, 0], paths[:, i, 1], color="0.6", linewidth=0.4, alpha=0.6)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, color="C0", label="z_1 (noise)")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, color="C3", label="z_0 (sample)")
        ax.set_title(f"{name}: excess length {excess_length(paths):.3f}")
        ax.set_aspect("equal")
    axes[0].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    jnp.zeros(())
    main()
