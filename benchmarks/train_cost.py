"""Train-step cost of NFDM (learnable Gaussian forward process) against the linear-interpolant
baseline with the same predictor, batch and optimiser, measured side by side in one process.

    python benchmarks/train_cost.py [--rounds 5] [--repeats 100]

Every model is built by `nfdm_de.build_model` from a `ModelConfig` and stepped with the default
`TrainConfig` batch (AdamW, clipping, EMA) in two ways:

- `nfdm_de.CompiledTrainStep`, the step `nfdm_de.train` runs (jitted once on the state's flat
  list of arrays) - the headline columns;
- `nfdm_de.train_step`, the same computation behind `eqx.filter_jit`, which re-partitions the
  whole state on every call (Python work that grows with the number of arrays).

Rows:

- the linear baseline (default predictor, `forward=linear`);
- NFDM with the default configuration (`ModelConfig()`: forward network 2x48);
- the same with the predictor's skip on the learned path (`predictor_skip=gaussian-full`), which
  adds a forward-network evaluation at the data mean;
- NFDM with an equal-size forward network (`forward_width=width, forward_depth=depth`).

Rounds are interleaved (one timing of every configuration and path per round) so drifting
machine load hits all of them alike. Reported: the best round's steps/s, its ratio to the best
linear round, and the median over rounds of the ratio within a round (less sensitive to a
single lucky round). Prints a Markdown table.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import jax.random as jr

import nfdm_de as nd


class Timed:
    """One configuration's state, stepped by one of the two step functions."""

    def __init__(self, config, batch, compiled):
        self.state = nd.init_train_state(config, batch.shape[1:])
        optimiser = nd.make_optimizer(config.optim)
        options = dict(
            curvature_weight=float(config.model.curvature),
            ema_decay=float(config.optim.ema_decay),
            num_levels=None,
        )
        if compiled:
            step_fn = nd.CompiledTrainStep(self.state, optimiser, **options)
            self.step_fn = lambda state, batch, step, lr: step_fn(state, batch, step, lr)
        else:
            self.step_fn = lambda state, batch, step, lr: nd.train_step(
                state, batch, step, lr, optimiser, **options
            )
        self.lr = jnp.asarray(config.optim.lr, batch.dtype)
        self.batch = batch
        self.offset = 0
        self.run(2)  # compile and warm up

    def run(self, n):
        for i in range(n):
            self.state, breakdown, _ = self.step_fn(
                self.state, self.batch, jnp.asarray(self.offset + i), self.lr
            )
        jax.block_until_ready(breakdown.total)
        self.offset += n

    def steps_per_second(self, repeats):
        start = time.perf_counter()
        self.run(repeats)
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
        # This skip evaluates the forward network once more, at the data mean.
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
    paths = {"compiled": True, "train_step": False}
    timed = {
        (name, path): Timed(config, batch, compiled)
        for name, config in configs.items()
        for path, compiled in paths.items()
    }
    rates = {key: [] for key in timed}
    for _ in range(args.rounds):
        for key, runner in timed.items():
            rates[key].append(runner.steps_per_second(args.repeats))
    print(
        f"batch {default.batch_size}, D = {args.data_size}, predictor {model.depth}x{model.width}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s), {args.rounds} "
        f"interleaved rounds of {args.repeats} steps\n"
    )
    print(
        "| configuration | forward net | steps/s (best) | ratio (best) | ratio (median) "
        "| `train_step` steps/s (best) | `train_step` ratio (best) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, config in configs.items():
        m = config.model
        net = (
            "—"
            if m.forward is nd.ForwardChoice.LINEAR
            else f"{m.resolved_forward_depth}x{m.resolved_forward_width}"
        )
        cells = []
        for path in paths:
            mine, base = rates[(name, path)], rates[("linear baseline", path)]
            best = max(mine)
            median = statistics.median(b / r for b, r in zip(base, mine, strict=True))
            cells.append((best, max(base) / best, median))
        (rate, ratio, median), (slow_rate, slow_ratio, _) = cells
        print(
            f"| {name} | {net} | {rate:.1f} | {ratio:.2f} | {median:.2f} | {slow_rate:.1f} "
            f"| {slow_ratio:.2f} |"
        )


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
