"""Solver ablation: sample quality against cost for NFDM, NFDM-OT and the linear baseline.

    python examples/solver_ablation.py [--data two-moons] [--steps 1500] [--lam 0.1]
                                       [--run-root runs/solver_ablation] [--plot ablation.png]

Trains three models with the library's `nfdm_de.train` (or loads them when their run directories
already hold a finished run):

- `nfdm`: the learnable Gaussian forward process with a learned volatility (default config);
- `nfdm-ot`: the learnable forward process, deterministic (`volatility=zero`) with the curvature
  penalty `--lam` (docs/math.md, "NFDM-OT");
- `linear`: the linear-interpolant baseline, deterministic (flow matching).

Then sweeps ODE solvers (Euler, Heun, Midpoint) and, for the stochastic model, the SDE
(Euler-Maruyama) over 1, 2, 4, 8, 16, 32 steps, plus adaptive Tsit5 at several tolerances, all
through `nfdm_de.sample`. Prints a Markdown table (NFE, energy distance and MMD to held-out data,
seconds of a warm call) and saves a plot of energy distance against NFE per model.
`--smoke` shrinks everything so that the whole script runs in seconds (used by the tests).
"""

import argparse
import dataclasses
import os

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd


def model_configs(lam: float) -> dict[str, nd.ModelConfig]:
    return {
        "nfdm": nd.ModelConfig(),
        # NFDM-OT starts from the straight linear path (the default VP anchor is curved).
        "nfdm-ot": nd.ModelConfig(
            volatility=nd.VolatilityChoice.ZERO,
            curvature=lam,
            forward_anchor=nd.AnchorChoice.LINEAR,
        ),
        "linear": nd.ModelConfig(
            forward=nd.ForwardChoice.LINEAR, volatility=nd.VolatilityChoice.ZERO
        ),
    }


def train_or_load(name, model_config, args) -> nd.LoadedRun:
    """Train into `<run-root>/<name>`, or load the finished run already there (resuming it when
    it stopped short of `args.steps`)."""
    run_dir = os.path.join(args.run_root, name)
    config = nd.TrainConfig(
        data=args.data,
        model=model_config,
        steps=args.steps,
        batch_size=args.batch_size,
        num_train=args.num_train,
        seed=args.seed,
        save_every=args.steps,
        log_every=max(args.steps // 10, 1),
        optim=dataclasses.replace(nd.OptimConfig(), warmup=min(200, args.steps // 10)),
        # The ablation compares solvers on the simulation-free models; a likelihood phase would
        # refit the baseline's ODE (and take minutes more on a CPU).
        likelihood_steps=0,
    )
    existing = nd.read_run_config(run_dir)
    # Settings left automatic (None) are stored resolved from the data; compare everything else.
    automatic = {}
    if existing is not None:
        fields = dataclasses.fields(config.model)
        automatic = {
            f.name: getattr(existing.model, f.name)
            for f in fields
            if getattr(config.model, f.name) is None
        }
    if existing is not None and existing.model != dataclasses.replace(config.model, **automatic):
        raise SystemExit(
            f"{run_dir} holds a run with another model config ({existing.model}); "
            "pass another --run-root."
        )
    latest = nd.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if latest is None or nd.read_header(latest)["step"] < config.steps:
        print(f"training {name} ({args.steps} steps) -> {run_dir}", flush=True)
        # nd.train refuses a resume whose settings differ in anything but the run length.
        nd.train(config, run_dir, resume=existing is not None)
    else:
        print(f"loading {name} from {run_dir}", flush=True)
    return nd.load_run(run_dir)


def sweep(args):
    """(model, kind, solver, solver object, steps or None, tolerance or None) rows to run."""
    if args.smoke:  # one fixed-step ODE, SDE and adaptive solve: every code path, few compiles
        return [
            ("nfdm", "ode", "euler", dfx.Euler(), 2, None),
            ("nfdm", "sde", "euler-maruyama", dfx.Euler(), 2, None),
            ("nfdm-ot", "ode", "euler", dfx.Euler(), 2, None),
            ("linear", "ode", "tsit5", dfx.Tsit5(), None, 1e-2),
        ]
    grid = []
    for name in ("nfdm", "nfdm-ot", "linear"):
        for solver_name, solver in (("euler", dfx.Euler()), ("heun", dfx.Heun())):
            for steps in args.step_counts:
                grid.append((name, "ode", solver_name, solver, steps, None))
        for steps in args.step_counts:
            grid.append((name, "ode", "midpoint", dfx.Midpoint(), steps, None))
        for tol in args.tolerances:
            grid.append((name, "ode", "tsit5", dfx.Tsit5(), None, tol))
        if name == "nfdm":  # the deterministic models' SDE is their ODE
            for steps in args.step_counts:
                grid.append((name, "sde", "euler-maruyama", dfx.Euler(), steps, None))
    return grid


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="two-moons")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-train", type=int, default=20_000)
    parser.add_argument("--lam", type=float, default=0.1, help="curvature weight of NFDM-OT")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run-root", default=os.path.join("runs", "solver_ablation"))
    parser.add_argument("--plot", default="solver_ablation.png")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, for the tests")
    args = parser.parse_args(argv)
    args.step_counts = (1, 2, 4, 8, 16, 32)
    args.tolerances = (1e-2, 1e-3, 1e-4)
    if args.smoke:
        args.steps, args.batch_size, args.num_train, args.num_samples = 30, 64, 512, 200

    configs = model_configs(args.lam)
    if args.smoke:  # tiny networks
        configs = {
            k: dataclasses.replace(c, width=16, depth=1, forward_width=16, forward_depth=1)
            for k, c in configs.items()
        }
    runs = {name: train_or_load(name, c, args) for name, c in configs.items()}
    held_out = load_held_out(args)

    rows = []
    for name, kind, solver_name, solver, steps, tol in sweep(args):
        run = runs[name]
        key = jr.key(args.seed + 1)
        kwargs = dict(solver=solver, steps=steps, sde=kind == "sde")
        if tol is not None:
            kwargs.update(rtol=tol, atol=tol)
        if not args.smoke:  # time a warm call: compile first
            nd.sample(run.model, args.num_samples, key=key, **kwargs)
        z, stats = nd.sample(run.model, args.num_samples, key=key, **kwargs)
        x = np.asarray(run.transform.from_model(z))
        energy = float(nd.energy_distance(x, held_out))
        discrepancy = float(nd.mmd(x, held_out))
        rows.append((name, kind, solver_name, steps, tol, stats.nfe, energy, discrepancy, stats))

    print("\n| model | dynamics | solver | steps / tol | NFE | energy distance | MMD | seconds |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, kind, solver_name, steps, tol, nfe, energy, discrepancy, stats in rows:
        setting = f"{steps}" if tol is None else f"tol {tol:g}"
        print(
            f"| {name} | {kind} | {solver_name} | {setting} | {nfe:.0f} | {energy:.4f} | "
            f"{discrepancy:.4f} | {stats.seconds:.3f} |"
        )
    plot(rows, args.plot)
    print(f"\nplot saved to {args.plot}")


def load_held_out(args):
    num = 200 if args.smoke else 2000
    return nd.load_dataset(args.data, split="test", num=num, seed=args.seed)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for name, kind, solver_name, _steps, tol, nfe, energy, *_ in rows:
        label = (name, kind, "adaptive" if tol is not None else solver_name)
        series.setdefault(label, []).append((nfe, max(energy, 1e-5)))
    colours = {"nfdm": "C0", "nfdm-ot": "C1", "linear": "C2"}
    markers = {"euler": "o", "heun": "s", "midpoint": "^", "adaptive": "*", "euler-maruyama": "x"}
    for (name, kind, solver_name), points in series.items():
        points.sort()
        nfe, energy = zip(*points, strict=True)
        ax.plot(
            nfe,
            energy,
            marker=markers[solver_name],
            color=colours[name],
            linestyle="--" if kind == "sde" else "-",
            label=f"{name} {kind} {solver_name}",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (vector-field evaluations per sample)")
    ax.set_ylabel("energy distance to held-out data")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    jnp.zeros(())
    main()
