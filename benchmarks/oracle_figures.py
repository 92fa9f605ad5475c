"""Figures of the Gaussian oracle (float64): ODE log-likelihood error against the closed form,
cost and accuracy of every ODE solver (fixed and adaptive, NFE), observed orders of Euler and
Heun, and Hutchinson's standard error versus the number of probes. Prints Markdown tables.

    PYTHONPATH=$PWD python benchmarks/oracle_figures.py

The oracle: data N(m, S), a Gaussian forward process mu = a(t) x, sigma = s(t), and the exact
posterior-mean predictor; the model's t = 0 marginal is then N(m, S + delta^2 I) exactly (see
tests/gaussian_oracle.py).
"""

import math
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import diffrax as dfx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import nfdm_de as nd  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gaussian_oracle import FORWARDS, gaussian_data, gaussian_log_prob, oracle_model  # noqa: E402


def likelihood_table():
    print("ODE log-likelihood vs closed form (Dopri5, rtol = atol = 1e-8, exact trace, 64 points)")
    print("\n| forward | D | max abs error (nats) | NFE |\n|---|---|---|---|")
    for name in ("linear", "vp"):
        for dim in (2, 16):
            mean, cov = gaussian_data(jr.key(dim), dim)
            forward = FORWARDS[name]()
            model = oracle_model(forward, mean, cov)
            marginal = cov + forward.delta**2 * jnp.eye(dim)
            x = jr.multivariate_normal(jr.key(1), mean, marginal, (64,))
            est, stats = nd.log_likelihood(model, x, rtol=1e-8, atol=1e-8)
            error = np.max(np.abs(np.asarray(est.value) - gaussian_log_prob(x, mean, marginal)))
            print(f"| {name} | {dim} | {error:.1e} | {stats.nfe:.0f} |")


def solver_table():
    mean, cov = gaussian_data(jr.key(2), 2)
    model = oracle_model(FORWARDS["vp"](), mean, cov)
    key = jr.key(3)
    reference, _ = nd.sample(model, 256, key=key, solver=dfx.Dopri8(), rtol=1e-12, atol=1e-12)
    print("\nSampling the oracle (vp, D = 2, 256 samples): max abs error vs Dopri8 at 1e-12")
    print("\n| solver | 10 fixed steps: NFE | error | adaptive 1e-5: NFE | accepted/rejected "
          "| error |\n|---|---|---|---|---|---|")  # fmt: skip
    for solver in (dfx.Euler(), dfx.Heun(), dfx.Midpoint(), dfx.Ralston(), dfx.Bosh3(),
                   dfx.Tsit5(), dfx.Dopri5(), dfx.Dopri8()):  # fmt: skip
        fixed, fixed_stats = nd.sample(model, 256, key=key, solver=solver, steps=10)
        row = f"| {type(solver).__name__} | {fixed_stats.nfe:.0f} | "
        row += f"{float(jnp.max(jnp.abs(fixed - reference))):.1e} | "
        if isinstance(solver, dfx.Euler):
            row += "- | - | - |"
        else:
            adaptive, stats = nd.sample(model, 256, key=key, solver=solver, rtol=1e-5, atol=1e-5)
            row += f"{stats.nfe:.0f} | {stats.accepted_steps:.0f}/{stats.rejected_steps:.0f} | "
            row += f"{float(jnp.max(jnp.abs(adaptive - reference))):.1e} |"
        print(row)
    print("\nObserved order log2(e_N / e_2N) of fixed-step solves:")
    print("\n| solver | N = 16 | N = 32 | N = 64 |\n|---|---|---|---|")
    for solver in (dfx.Euler(), dfx.Heun()):
        errors = {}
        for steps in (16, 32, 64, 128):
            approx, _ = nd.sample(model, 256, key=key, solver=solver, steps=steps)
            errors[steps] = float(jnp.max(jnp.abs(approx - reference)))
        orders = [math.log2(errors[n] / errors[2 * n]) for n in (16, 32, 64)]
        print(f"| {type(solver).__name__} | " + " | ".join(f"{o:.3f}" for o in orders) + " |")


def hutchinson_table():
    dim, num = 16, 64
    mean, cov = gaussian_data(jr.key(dim), dim)
    forward = FORWARDS["linear"]()
    model = oracle_model(forward, mean, cov)
    x = jr.multivariate_normal(jr.key(4), mean, cov + forward.delta**2 * jnp.eye(dim), (num,))
    exact, _ = nd.log_likelihood(model, x, rtol=1e-7, atol=1e-7)
    print(f"\nHutchinson vs exact trace (linear, D = {dim}, {num} points, rtol = atol = 1e-7)")
    print("\n| probes K | distribution | RMS per-example stderr | mean error / its stderr |")
    print("|---|---|---|---|")
    for k in (1, 4, 16, 64):
        for distribution in (nd.RademacherProbe(), nd.GaussianProbe()):
            trace = nd.Hutchinson(num_probes=k, distribution=distribution)
            est, _ = nd.log_likelihood(model, x, key=jr.key(k), trace=trace, rtol=1e-7, atol=1e-7)
            diff = np.asarray(est.value - exact.value)
            if k > 1:
                rms = float(np.sqrt(np.mean(np.asarray(est.example_stderr) ** 2)))
                z = float(np.mean(diff)) / (
                    math.sqrt(float(np.sum(np.asarray(est.example_stderr) ** 2))) / num
                )
                print(f"| {k} | {type(distribution).__name__} | {rms:.4f} | {z:+.2f} |")
            else:
                rms = float(np.std(diff, ddof=1))
                print(f"| {k} | {type(distribution).__name__} | {rms:.4f} (spread) | - |")


if __name__ == "__main__":
    likelihood_table()
    solver_table()
    hutchinson_table()
