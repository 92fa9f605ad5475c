"""A bridge between two 2-D distributions, in one picture.

Trains a bridge from `eight-gaussians` (source, t = 1) to `two-moons` (target, t = 0) with
`nd.train` (the same loop as `nfdm-de train --data two-moons --source eight-gaussians`), maps
held-out source points with the generative SDE and ODE (`nd.bridge_sample`), and draws source,
target and mapped points with a few source -> target pairs joined by lines.

    python examples/bridge_2d.py [--steps 3000] [--out bridge_2d.png] [--smoke]

`--smoke` trains 20 steps of a tiny network and maps 64 points (a seconds-long check that the
pieces fit; the picture is then meaningless).
"""

import argparse
import os
import tempfile

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np

import nfdm_de as nd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="two-moons")
    parser.add_argument("--source", default="eight-gaussians")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--out", default="bridge_2d.png")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    width, depth, num, steps = 128, 3, args.num, args.steps
    if args.smoke:
        width, depth, num, steps = 8, 1, 64, 20

    run_dir = args.run_dir or tempfile.mkdtemp(prefix="bridge_2d_")
    config = nd.TrainConfig(
        data=args.target,
        source=args.source,
        steps=steps,
        save_every=steps,
        log_every=max(steps // 10, 1),
        model=nd.ModelConfig(width=width, depth=depth),
    )
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
        nd.train(config, run_dir)
    run = nd.load_run(run_dir)

    source = nd.load_dataset(args.source, split="test", num=num)
    target = nd.load_dataset(args.target, split="test", num=num)
    c = run.source_transform.to_model(jnp.asarray(source, jnp.result_type(float)))
    mapped = {}
    for name, sde, solver, n_steps in (
        ("SDE", True, dfx.Euler(), 200),
        ("ODE", False, dfx.Tsit5(), None),
    ):
        z, stats = nd.bridge_sample(
            run.model, c, key=jr.key(0), solver=solver, steps=n_steps, sde=sde
        )
        mapped[name] = np.asarray(run.transform.from_model(z))
        distance = float(nd.energy_distance(mapped[name], target))
        print(
            f"{name}: {stats.nfe:.0f} NFE per point, energy distance to the target {distance:.4f}"
        )

    fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
    for ax, (name, points) in zip(axes, mapped.items(), strict=True):
        ax.scatter(*source.T, s=2, c="tab:gray", alpha=0.4, label=f"source ({args.source})")
        ax.scatter(*target.T, s=2, c="tab:green", alpha=0.3, label=f"target ({args.target})")
        ax.scatter(*points.T, s=2, c="tab:blue", alpha=0.6, label=f"mapped ({name})")
        for k in range(min(24, len(points))):
            ax.plot(*np.stack([source[k], points[k]]).T, lw=0.5, c="tab:orange", alpha=0.7)
        ax.set_title(f"bridge {args.source} -> {args.target}, {name}")
        ax.set_aspect("equal")
        ax.legend(loc="upper right", markerscale=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} (run in {run_dir})")


if __name__ == "__main__":
    main()
