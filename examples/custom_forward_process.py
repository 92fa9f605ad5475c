"""A user-defined forward process, trained by `nfdm_de.train` and sampled.

    python examples/custom_forward_process.py [--data eight-gaussians] [--steps 1000]
        [--run-dir runs/custom_forward_process] [--smoke]

`LearnedScaleInterpolant` keeps the straight mean path mu = (1 - t) x of the linear interpolant
but learns a per-dimension noise schedule,

    log sigma(t) = log(t + (1 - t) delta) + t (1 - t) a,      a in R^D learned,

which satisfies both boundary conditions (sigma(0) = delta, sigma(1) = 1) for any `a`. Subclassing
`nfdm_de.AbstractGaussianForwardProcess` only needs `mean_and_log_scale`: velocity, score and the
loss's conditional fields follow in closed form (a non-Gaussian process would subclass
`AbstractForwardProcess` and define `transform`, `inverse` and `log_det_inverse`).
"""

import argparse

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float

import nfdm_de as nd


class LearnedScaleInterpolant(nd.AbstractGaussianForwardProcess):
    log_scale_correction: Float[Array, " dim"]
    delta: float = 0.01

    def mean_and_log_scale(self, x, t):
        t = jnp.asarray(t, x.dtype)
        base = jnp.log(t + (1 - t) * self.delta)
        return (1 - t) * x, base + t * (1 - t) * self.log_scale_correction.astype(x.dtype)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="eight-gaussians")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--run-dir", default="runs/custom_forward_process")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    width, depth = (16, 1) if args.smoke else (128, 3)
    config = nd.TrainConfig(
        data=args.data,
        steps=20 if args.smoke else args.steps,
        batch_size=64 if args.smoke else 256,
        likelihood_steps=2 if args.smoke else None,  # None: the default phase (steps // 15)
        save_every=10 if args.smoke else 500,
        log_every=10 if args.smoke else 100,
    )
    dim = nd.load_dataset(args.data, split="test", num=1).shape[1]

    def build(key):
        k_pred, k_vol = jr.split(key)
        return nd.NFDM(
            LearnedScaleInterpolant(jnp.zeros(dim)),
            nd.mlp_predictor(dim, width=width, depth=depth, input_octaves=4, key=k_pred),
            nd.LearnedVolatility(key=k_vol),
        )

    # `train` takes the user-built model in place of the one `config.model` describes, and runs
    # it as any other run: checkpoints, exact resume, EMA, the likelihood phase.
    result = nd.train(config, args.run_dir, model=build(jr.key(0)), log=print)
    print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}")

    # Its checkpoints hold values; the structure comes from the same code (`like`).
    run = nd.load_run(args.run_dir, like=build(jr.key(1)))
    model = run.model
    steps = 16 if args.smoke else 64
    samples, stats = nd.sample(model, 1000, key=jr.key(2), solver=dfx.Heun(), steps=steps)
    held_out = nd.load_dataset(args.data, split="test", num=1000)
    correction = jax.device_get(model.forward.log_scale_correction)
    print(f"learned log-scale correction a = {correction}")
    x = run.to_data_units(samples)
    print(
        f"energy distance to held-out data: {float(nd.energy_distance(x, held_out)):.4f} "
        f"({stats.nfe:.0f} evaluations per sample)"
    )


if __name__ == "__main__":
    main()
