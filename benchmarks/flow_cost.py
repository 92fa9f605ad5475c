"""Train-step cost of the non-Gaussian forward process (`NeuralFlow`) against the Gaussian NFDM.

Every variant trains the same predictor (`mlp_predictor`, 128 x 3) and volatility (learned) with
Adam on a fixed batch; only the forward process changes. Each step function is compiled and run
once before timing (steady state); then `--repeats` blocks of `--steps` steps are timed and the
median per-step time is reported, with its ratio to the Gaussian NFDM and to the fixed linear
path. All variants run side by side in one process, in float32 (the library default).

    python benchmarks/flow_cost.py [--batch-size 256] [--data-size 2] [--steps 50] [--repeats 5]

Prints a Markdown table on stdout.
"""

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import nfdm_de as nd


class GenericAutodiffPath(nd.AbstractForwardProcess):
    """Delegates F, F^{-1} and log|det| to a process but keeps the base class's generic
    velocity/score (what a user's own subclass gets): shows what the override saves."""

    inner: nd.AbstractForwardProcess
    delta: float = eqx.field(static=True)

    def __init__(self, inner):
        self.inner = inner
        self.delta = inner.delta

    def transform(self, eps, t, x):
        return self.inner.transform(eps, t, x)

    def inverse(self, z, t, x):
        return self.inner.inverse(z, t, x)

    def log_det_inverse(self, z, t, x):
        return self.inner.log_det_inverse(z, t, x)


def _variants(data_size, key):
    k1, k2, k3 = jr.split(key, 3)
    flow = nd.neural_flow(data_size, key=k2)
    return {
        "linear (fixed)": nd.LinearInterpolant(),
        "neural-gaussian (128x3)": nd.neural_gaussian(data_size, key=k1),
        "neural-flow (default: 4 couplings 64x2, anchor 64x2)": flow,
        "neural-flow, generic autodiff path": GenericAutodiffPath(flow),
        "neural-flow (4 couplings 128x3, anchor 128x3)": nd.neural_flow(
            data_size, width=128, depth=3, key=k3
        ),
    }


def _time_variant(forward, data, args, key):
    k1, k2 = jr.split(key)
    model = nd.NFDM(
        forward,
        nd.mlp_predictor(data.shape[1], key=k1),
        nd.LearnedVolatility(key=k2),
        data_shape=(data.shape[1],),
    )
    model = jax.tree.map(lambda a: a.astype(jnp.float32) if eqx.is_inexact_array(a) else a, model)
    optimiser = optax.adam(1e-3)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def steps(model, opt_state, key):
        # `args.steps` train steps in one compiled loop, so Python dispatch is not timed.
        def body(carry, key):
            model, opt_state = carry
            value, grads = eqx.filter_value_and_grad(lambda m: nd.loss(m, data, key=key)[0])(model)
            updates, opt_state = optimiser.update(
                grads, opt_state, eqx.filter(model, eqx.is_inexact_array)
            )
            return (eqx.apply_updates(model, updates), opt_state), value

        dynamic, static = eqx.partition((model, opt_state), eqx.is_array)

        def scan_body(dynamic, key):
            carry, value = body(eqx.combine(dynamic, static), key)
            return eqx.filter(carry, eqx.is_array), value

        dynamic, values = jax.lax.scan(scan_body, dynamic, jr.split(key, args.steps))
        model, opt_state = eqx.combine(dynamic, static)
        return model, opt_state, values

    start = time.perf_counter()
    model, opt_state, values = steps(model, opt_state, jr.key(0))
    jax.block_until_ready(values)
    compile_seconds = time.perf_counter() - start
    per_step = []
    for i in range(args.repeats):
        start = time.perf_counter()
        model, opt_state, values = steps(model, opt_state, jr.key(i + 1))
        jax.block_until_ready(values)
        per_step.append((time.perf_counter() - start) / args.steps)
    return statistics.median(per_step), compile_seconds, float(values[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    data = jr.normal(jr.key(1), (args.batch_size, args.data_size), jnp.float32)
    results = {
        name: _time_variant(forward, data, args, jr.key(2))
        for name, forward in _variants(args.data_size, jr.key(0)).items()
    }
    gaussian = results["neural-gaussian (128x3)"][0]
    linear = results["linear (fixed)"][0]
    print(
        f"Train step, batch {args.batch_size}, D = {args.data_size}, float32, "
        f"{jax.devices()[0].platform} ({jax.device_count()} device(s)); median of "
        f"{args.repeats} x {args.steps} steps after compilation.\n"
    )
    print("| forward process | ms / step | vs neural-gaussian | vs linear | compile (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, (seconds, compile_seconds, _) in results.items():
        print(
            f"| {name} | {1e3 * seconds:.2f} | {seconds / gaussian:.2f}x | "
            f"{seconds / linear:.2f}x | {compile_seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
