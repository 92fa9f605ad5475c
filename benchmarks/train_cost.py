"""Train-step cost of NFDM (learnable Gaussian forward process) against the linear-interpolant
baseline with the same predictor, batch and optimiser, measured side by side in one process.

    python benchmarks/train_cost.py [--batch 256] [--repeats 200]

Prints a Markdown table of steady-state steps/s and the ratio of step times.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import nfdm_de as nd


def make_step(model, optimiser):
    @eqx.filter_jit
    def step(model, opt_state, key, batch):
        value, grads = eqx.filter_value_and_grad(lambda m: nd.loss(m, key, batch)[0])(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value

    return step


def steps_per_second(model, batch, repeats, rounds=5):
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(model, optimiser)
    model, opt_state, value = step(model, opt_state, jr.key(0), batch)  # compile
    jax.block_until_ready(value)
    best = float("inf")
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(repeats):
            model, opt_state, value = step(model, opt_state, jr.key(i + r * repeats), batch)
        jax.block_until_ready(value)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1.0 / best


def build(forward_kind, *, data_size, width, depth, forward_width, forward_depth, key):
    kf, kp, kv = jr.split(key, 3)
    predictor = nd.mlp_predictor(data_size, width=width, depth=depth, key=kp)
    volatility = nd.LearnedVolatility(key=kv)
    if forward_kind == "linear":
        forward = nd.LinearInterpolant()
    else:
        forward = nd.neural_gaussian(data_size, width=forward_width, depth=forward_depth, key=kf)
    return nd.NFDM(forward, predictor, volatility)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--data-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--default-forward-width", type=int, default=64)
    parser.add_argument("--default-forward-depth", type=int, default=2)
    args = parser.parse_args()

    batch = jr.normal(jr.key(1), (args.batch, args.data_size))
    configs = [
        ("linear baseline", "linear", args.width, args.depth),
        ("NFDM, equal-size forward net", "neural", args.width, args.depth),
        (
            "NFDM, default (smaller forward net)",
            "neural",
            args.default_forward_width,
            args.default_forward_depth,
        ),
    ]
    # Interleave measurements so that drifting machine load affects all configurations alike.
    rates = {name: [] for name, *_ in configs}
    models = {
        name: build(
            kind,
            data_size=args.data_size,
            width=args.width,
            depth=args.depth,
            forward_width=fw,
            forward_depth=fd,
            key=jr.key(0),
        )
        for name, kind, fw, fd in configs
    }
    for _ in range(3):
        for name, *_ in configs:
            rates[name].append(steps_per_second(models[name], batch, args.repeats, rounds=1))
    base = max(rates["linear baseline"])
    print(
        f"batch {args.batch}, D = {args.data_size}, predictor {args.depth}x{args.width}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)\n"
    )
    print("| configuration | forward net | steps/s | step-time ratio vs linear |")
    print("|---|---|---:|---:|")
    for name, kind, fw, fd in configs:
        rate = max(rates[name])
        net = "—" if kind == "linear" else f"{fd}x{fw}"
        print(f"| {name} | {net} | {rate:.1f} | {base / rate:.2f} |")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
