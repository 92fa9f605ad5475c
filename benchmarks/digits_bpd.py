"""Digits (8x8x1 images, 17 levels) bits/dim on the held-out split after a fixed budget.

NFDM (neural-gaussian forward process) against the linear and VP baselines: the same U-Net
predictor (and, for NFDM, a U-Net forward network), the same learned volatility, optimiser,
batches and number of steps. Each run goes through `nd.train` (the same code as
`nfdm-de train --data digits-images`), then is evaluated on the 359 held-out images with the
run's dequantization (y = (x + u)/17, then the run's affine map; offset included):

- bound: the variational bound (what the stochastic model optimises), `--bound-samples` (t, eps)
  pairs per image;
- ODE: the probability-flow ODE with a Hutchinson trace (`--probes` Rademacher probes), Dopri5 at
  rtol = atol = `--tol`, on the first `--ode-num` held-out images (the same ones for every model).

Prints a Markdown table. Usage:

    PYTHONPATH=$PWD python benchmarks/digits_bpd.py [--steps 400] [--channels 8] [--json]
"""

import argparse
import json
import math
import tempfile
import time

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd


def dequantization_of(run):
    # s = (y - shift) / scale with y = (x + u) / K: the run's transform as a dequantizer.
    scale = 1.0 / run.transform.scale
    return nd.Dequantization(
        num_levels=int(run.num_levels), scale=scale, shift=-run.transform.shift * scale
    )


def evaluate(run, x_test, *, key, bound_samples, batch, ode_num, probes, tol):
    deq = dequantization_of(run)
    dims = math.prod(run.model.data_shape)
    x_int = jnp.asarray(np.rint(x_test).astype(np.int32))
    start = time.perf_counter()
    bounds = []
    for i in range(0, x_int.shape[0], batch):
        part = x_int[i : i + batch]
        count = part.shape[0]
        if count < batch:  # one compiled shape: pad with repeats, drop them below
            part = jnp.concatenate([part, part[jnp.arange(batch - count) % count]])
        estimate, _ = nd.variational_bound(
            run.model,
            part,
            key=jr.fold_in(key, i),
            num_samples=bound_samples,
            dequantization=deq,
        )
        bounds.append(np.asarray(estimate.value)[:count])
    bounds = np.concatenate(bounds)
    bound_seconds = time.perf_counter() - start
    start = time.perf_counter()
    estimate, stats = nd.log_likelihood(
        run.model,
        x_int[:ode_num],
        key=jr.fold_in(key, 10**6),
        trace=nd.Hutchinson(num_probes=probes),
        solver=dfx.Dopri5(),
        rtol=tol,
        atol=tol,
        dequantization=deq,
    )
    ode = -np.asarray(estimate.value)
    ode_seconds = time.perf_counter() - start
    to_bpd = 1.0 / (dims * math.log(2))
    return {
        "bpd_bound": float(bounds.mean() * to_bpd),
        "bpd_bound_se": float(bounds.std(ddof=1) / math.sqrt(bounds.size) * to_bpd),
        "bpd_ode": float(ode.mean() * to_bpd),
        "bpd_ode_se": float(ode.std(ddof=1) / math.sqrt(ode.size) * to_bpd),
        "nfe_ode": float(stats.nfe),
        "bound_seconds": bound_seconds,
        "ode_seconds": ode_seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound-samples", type=int, default=16)
    parser.add_argument("--ode-num", type=int, default=100)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--forwards", default="neural-gaussian,linear,vp")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    x_test = nd.load_dataset("digits-images", split="test")
    rows = []
    for name in args.forwards.split(","):
        config = nd.TrainConfig(
            data="digits-images",
            model=nd.ModelConfig(forward=nd.ForwardChoice(name), channels=args.channels),
            optim=nd.OptimConfig(lr=args.lr, warmup=min(100, args.steps // 10)),
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            save_every=args.steps,
            log_every=max(1, args.steps // 10),
        )
        with tempfile.TemporaryDirectory() as run_dir:
            start = time.perf_counter()
            result = nd.train(config, run_dir)
            train_seconds = time.perf_counter() - start
            run = nd.load_run(run_dir)
        row = {"forward": name, "final_loss": result.final_loss, "train_seconds": train_seconds}
        row.update(
            evaluate(
                run,
                x_test,
                key=jr.key(args.seed + 1),
                bound_samples=args.bound_samples,
                batch=128,
                ode_num=args.ode_num,
                probes=args.probes,
                tol=args.tol,
            )
        )
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(
        f"\ndigits-images, {args.steps} steps, batch {args.batch_size}, U-Net base channels "
        f"{args.channels}, lr {args.lr}, learned g; bound: {x_test.shape[0]} held-out images x "
        f"{args.bound_samples} samples; ODE: first {args.ode_num}, Dopri5 {args.tol:g}, "
        f"Hutchinson x{args.probes}\n"
    )
    print(
        "| forward | final train loss (nats) | bits/dim, bound | bits/dim, ODE | ODE NFE "
        "| train s | eval s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['forward']} | {r['final_loss']:.1f} | {r['bpd_bound']:.3f} ± "
            f"{r['bpd_bound_se']:.3f} | {r['bpd_ode']:.3f} ± {r['bpd_ode_se']:.3f} | "
            f"{r['nfe_ode']:.0f} | {r['train_seconds']:.0f} | "
            f"{r['bound_seconds'] + r['ode_seconds']:.0f} |"
        )
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
