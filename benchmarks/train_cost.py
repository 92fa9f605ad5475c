"""Train-step cost of NFDM (learnable Gaussian forward process) against the linear-interpolant
baseline with the same predictor, batch and optimiser, measured side by side in one process.

    python benchmarks/train_cost.py [--rounds 5] [--repeats 100]

Every model is built by `nfdm_de.build_model` from a `ModelConfig` and stepped by the library's
own jitted `nfdm_de.train_step` (AdamW, clipping, EMA), with the default `TrainConfig` batch. Rows:

- the linear baseline (default predictor, `forward=linear`);
- NFDM with the default configuration (`ModelConfig()`: forward network 2x48);
- the same with the predictor's skip on the learned path (`predictor_skip=gaussian-full`), which
  adds a forward-network evaluation at the data mean;
- NFDM with an equal-size forward network (`forward_width=width, forward_depth=depth`).

Rounds are interleaved (one timing of every configuration per round) so drifting machine load
hits all of them alike; the best round of each is reported. Prints a Markdown table.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import jax.random as jr

import nfdm_de as nd


def steps_per_second(config, batch, repeats):
    state = nd.init_train_state(config, batch.shape[1:])
    optimiser = nd.make_optimizer(config.optim)
    lr = jnp.asarray(config.optim.lr, batch.dtype)

    def run(state, n, offset):
        for i in range(n):
            state, breakdown, _ = nd.train_step(
                state,
                batch,
                jnp.asarray(offset + i),
                lr,
                optimiser,
                curvature_weight=float(config.model.curvature),
                ema_decay=float(config.optim.ema_decay),
                num_levels=None,
            )
        jax.block_until_ready(breakdown.total)
        return state

    state = run(state, 2, 0)  # compile and warm up
    start = time.perf_counter()
    run(state, repeats, 2)
    return repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--data-size", type=int, default=2)
    parser.add_argument(
        "--extra",
        default="",
        help="extra forward-network sizes to time, e.g. '1x64,2x32' (depth x width)",
    )
    args = parser.parse_args()

    default = nd.TrainConfig()
    model = default.model
    configs = {
        "linear baseline": dataclasses.replace(
            default, model=dataclasses.replace(model, forward=nd.ForwardChoice.LINEAR)
        ),
        "NFDM, default config": default,
        # This skip evaluates the forward network once more, at the data mean (session 12).
        "NFDM, learned-path skip (gaussian-full)": dataclasses.replace(
            default,
            model=dataclasses.replace(model, predictor_skip=nd.PredictorSkipChoice.GAUSSIAN_FULL),
        ),
        "NFDM, equal-size forward net": dataclasses.replace(
            default,
            model=dataclasses.replace(model, forward_width=model.width, forward_depth=model.depth),
        ),
    }
    for spec in filter(None, args.extra.split(",")):
        depth, width = (int(n) for n in spec.split("x"))
        configs[f"NFDM, forward net {spec}"] = dataclasses.replace(
            default, model=dataclasses.replace(model, forward_width=width, forward_depth=depth)
        )
    batch = jr.normal(jr.key(1), (default.batch_size, args.data_size), jnp.result_type(float))
    rates = {name: [] for name in configs}
    for _ in range(args.rounds):
        for name, config in configs.items():
            rates[name].append(steps_per_second(config, batch, args.repeats))
    base = max(rates["linear baseline"])
    print(
        f"batch {default.batch_size}, D = {args.data_size}, predictor {model.depth}x{model.width}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s), best of {args.rounds} "
        f"interleaved rounds of {args.repeats} steps\n"
    )
    print("| configuration | forward net | steps/s (best) | step-time ratio vs linear |")
    print("|---|---|---:|---:|")
    for name, config in configs.items():
        rate = max(rates[name])
        m = config.model
        net = (
            "—"
            if m.forward is nd.ForwardChoice.LINEAR
            else f"{m.resolved_forward_depth}x{m.resolved_forward_width}"
        )
        print(f"| {name} | {net} | {rate:.1f} | {base / rate:.2f} |")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
