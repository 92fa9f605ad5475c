"""Speed of exact likelihoods, side by side with Meta's `flow_matching` (PyTorch), in one run.

    PYTHONPATH=$PWD python benchmarks/likelihood_speed.py [--dims 2 8 32] [--num 5000]
        [--train-steps 300] [--tol 1e-5] [--threads 2]

For each dimension D the data are D/2 independent copies of the eight-Gaussians set under one
fixed random rotation (D = 2: the set itself), standardised. Three models of the same size
(a 3x128 MLP), each trained for `--train-steps` steps of batch 256:

- `flow_matching`: its `MLP`-style velocity network trained on the CondOT path (its
  `AffineProbPath` with `CondOTScheduler`), likelihood by `ODESolver.compute_likelihood`
  (torchdiffeq dopri5);
- `nfdm-de FM`: this project's flow-matching model (`forward=linear`, `volatility=zero`), with
  its default predictor for the dimension (Fourier input features: 4 octaves at D = 2, 2 at
  D = 8, none at D = 32; residual hidden layers at D = 8), and as a plain MLP
  (`input_octaves=0`, `predictor_residual=False`) like the peer's;
- `nfdm-de NFDM`: the default NFDM (learnable forward process, no likelihood phase).

Each likelihood is the exact divergence and Hutchinson's estimator (one Rademacher probe), on
the same `--num` held-out points at rtol = atol = `--tol` with Dopri5. The error norms differ:
torchdiffeq's is the RMS over the whole batch's state, this project's default the largest
per-example RMS (every example at least as accurate as its own solve), so at equal tolerance
this project does at least as much work per example; its rows run with each `ErrorNorm`:
`example-max` (the default) and `batch-rms` (torchdiffeq's kind). `compile` is the first call's
extra time over the second (JAX's tracing and XLA compilation; PyTorch has none); `run` the
second call. NFE counts vector-field evaluations per example (flow_matching's: calls of its
network, the initial step-size search included). `error` is the mean per-example
|NLL - reference| against the same model solved at rtol = atol = 1e-7 by the same library
(exact-trace rows).

Last, one likelihood-phase step against one simulation-free step of the default 2-D
configuration (`nfdm-de train --data eight-gaussians`), both compiled, on the same batch.
"""

import argparse
import dataclasses
import math
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd

# The reference solve of the error column: rtol = atol = 1e-7, exact trace.
REFERENCE_TOL = 1e-7


def rotated_product(dim: int, num: int, seed: int) -> np.ndarray:
    """`num` points of D/2 independent eight-Gaussians pairs under one fixed rotation."""
    if dim % 2:
        raise ValueError(f"--dims must be even; got {dim}.")
    pairs = nd.load_dataset("eight-gaussians", split="train", num=num * (dim // 2), seed=seed)
    x = np.asarray(pairs).reshape(num, dim)
    if dim > 2:
        q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((dim, dim)))
        x = x @ q
    return x.astype(np.float32)


@dataclasses.dataclass
class Timing:
    compile_s: float
    run_s: float
    nfe: float
    values: np.ndarray  # per-example NLL
    error: float | None = None  # mean |NLL - reference| per example (exact trace only)

    def row(self, method: str, dim: int, trace: str, num: int) -> str:
        rate = num / self.run_s
        error = "" if self.error is None else f"{self.error:.1e}"
        return (
            f"| {dim} | {method} | {trace} | {self.nfe:.0f} | {self.compile_s:.2f} | "
            f"{self.run_s:.2f} | {rate:,.0f} | {float(np.mean(self.values)):.3f} | {error} |"
        )


# --- this project ---------------------------------------------------------------------------


def train_nfdm(
    train: np.ndarray, steps: int, *, linear: bool, workdir: str, octaves: int | None = None
) -> nd.LoadedRun:
    path = os.path.join(workdir, f"train_{train.shape[1]}.npy")
    np.save(path, train)
    model = nd.ModelConfig(
        forward=nd.ForwardChoice.LINEAR if linear else nd.ForwardChoice.NEURAL_GAUSSIAN,
        volatility=nd.VolatilityChoice.ZERO if linear else nd.VolatilityChoice.LEARNED,
        input_octaves=octaves,
        # The plain-MLP variant (no input features) takes plain hidden layers too.
        predictor_residual=False if octaves == 0 else None,
    )
    config = nd.TrainConfig(data=path, model=model, steps=steps, likelihood_steps=0)
    features = "auto" if octaves is None else octaves
    run_dir = os.path.join(workdir, f"{'fm' if linear else 'nfdm'}{features}_{train.shape[1]}")
    nd.train(config, run_dir, log=lambda message: None)
    return nd.load_run(run_dir)


def nfdm_timing(
    run: nd.LoadedRun, test: np.ndarray, trace, tol: float, norm: nd.ErrorNorm
) -> Timing:
    def once():
        start = time.perf_counter()
        result = nd.evaluate_nll(
            run,
            test,
            (nd.NLLMethod.ODE,),
            key=jr.key(0),
            trace=trace,
            rtol=tol,
            atol=tol,
            batch_size=len(test),
            error_norm=norm,
        )[nd.NLLMethod.ODE]
        return time.perf_counter() - start, result

    first, _ = once()
    second, result = once()
    return Timing(max(first - second, 0.0), second, result.stats.nfe, result.values)


def phase_step_ratio(workdir: str, steps: int = 3000) -> tuple[float, float]:
    """(seconds per simulation-free step, per likelihood-phase step) of the default 2-D run,
    both at the state where its phase starts (after its `steps` simulation-free steps)."""
    from nfdm_de._train._loop import _compiled_steps
    from nfdm_de._train._optimizer import make_optimizer
    from nfdm_de._train._prepare import _load_data, _resolve_for_data, _restore
    from nfdm_de._train._run_dir import RunDirectory

    run_dir = os.path.join(workdir, "phase")
    config = nd.TrainConfig(data="eight-gaussians", steps=steps)
    nd.train(dataclasses.replace(config, likelihood_steps=0), run_dir, log=print)
    data = _load_data(config)
    config = _resolve_for_data(config, data)
    start = _restore(RunDirectory(run_dir), config)
    assert start is not None
    state = start.state
    simulation_free, phase = _compiled_steps(config, data, state, make_optimizer(config.optim))
    batch = jnp.asarray(data.train[: config.batch_size])
    lr = jnp.asarray(config.optim.lr)

    def per_step(step, repeats):
        out = step(state, batch, jnp.asarray(0), lr)  # compile
        jax.block_until_ready(out)
        start = time.perf_counter()
        for i in range(repeats):
            out = step(state, batch, jnp.asarray(i + 1), lr)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats

    return per_step(simulation_free, 200), per_step(phase, 5)


# --- Meta's flow_matching ------------------------------------------------------------------


def train_meta_flow_matching(
    train: np.ndarray, steps: int, width: int = 128, batch: int = 256, lr: float = 1e-3
):
    """Meta's `flow_matching`: a 3-hidden-layer SiLU MLP velocity on the CondOT path, trained
    with Adam for `steps` steps of `batch` points. Returns the torch module (its `calls` count
    vector-field evaluations)."""
    import torch
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    torch.manual_seed(0)
    dim = train.shape[1]

    class Velocity(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(dim + 1, width),
                torch.nn.SiLU(),
                torch.nn.Linear(width, width),
                torch.nn.SiLU(),
                torch.nn.Linear(width, width),
                torch.nn.SiLU(),
                torch.nn.Linear(width, dim),
            )
            self.calls = 0

        def forward(self, x, t):
            self.calls += 1
            t = t.reshape(-1, 1).expand(x.shape[0], 1).to(x.dtype)
            return self.net(torch.cat([x, t], dim=1))

    model = Velocity()
    path = AffineProbPath(scheduler=CondOTScheduler())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.from_numpy(train)
    for _ in range(steps):
        x_1 = data[torch.randint(0, len(data), (batch,))]
        x_0 = torch.randn_like(x_1)
        t = torch.rand(batch)
        sample = path.sample(t=t, x_0=x_0, x_1=x_1)
        loss = torch.mean((model(sample.x_t, sample.t) - sample.dx_t) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def meta_flow_matching_nll(model, x: np.ndarray, tol: float, exact: bool = True) -> np.ndarray:
    """-log p(x) by `ODESolver.compute_likelihood` (dopri5 at rtol = atol = `tol`)."""
    import torch
    from flow_matching.solver import ODESolver

    dim = x.shape[1]

    def log_p0(z):
        return -0.5 * torch.sum(z**2, dim=1) - 0.5 * dim * math.log(2 * math.pi)

    _, log_p = ODESolver(velocity_model=model).compute_likelihood(
        x_1=torch.from_numpy(x),
        log_p0=log_p0,
        step_size=None,
        method="dopri5",
        atol=tol,
        rtol=tol,
        exact_divergence=exact,
        time_grid=torch.tensor([1.0, 0.0]),
    )
    return -log_p.detach().numpy()


def flow_matching_run(train: np.ndarray, test: np.ndarray, steps: int, tol: float):
    model = train_meta_flow_matching(train, steps)

    def timing(exact: bool, tol: float = tol) -> Timing:
        model.calls = 0
        start = time.perf_counter()
        nll = meta_flow_matching_nll(model, test, tol, exact)
        seconds = time.perf_counter() - start
        return Timing(0.0, seconds, float(model.calls), nll)

    return timing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--num", type=int, default=5000)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--phase-after", type=int, default=3000, help="simulation-free steps before the phase"
    )
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(args.threads)
        import flow_matching  # noqa: F401
    except ImportError:
        torch = None
        print("flow_matching is not installed (pip install -e '.[bench]'): its rows are skipped")

    header = (
        "| D | model | trace | NFE | compile (s) | run (s) | examples/s | NLL (nats, "
        "standardised) | error |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for dim in args.dims:
            train = rotated_product(dim, 20_000, seed=0)
            test = rotated_product(dim, args.num, seed=1)
            scale = train.std(axis=0)
            shift = train.mean(axis=0)
            train_std, test_std = (train - shift) / scale, (test - shift) / scale
            runs = {
                "nfdm-de FM": train_nfdm(train_std, args.train_steps, linear=True, workdir=workdir),
                "nfdm-de FM, plain MLP": train_nfdm(
                    train_std, args.train_steps, linear=True, workdir=workdir, octaves=0
                ),
                "nfdm-de NFDM": train_nfdm(
                    train_std, args.train_steps, linear=False, workdir=workdir
                ),
            }
            timings = {}
            references = {}
            peer = None
            if torch is not None:  # trained once; its exact solves draw no random numbers
                peer = flow_matching_run(train_std, test_std, args.train_steps, args.tol)
            for trace_name, trace in (("exact", nd.ExactTrace()), ("hutchinson", nd.Hutchinson())):
                if peer is not None:
                    timings["flow_matching", trace_name] = peer(trace_name == "exact")
                    if trace_name == "exact":
                        references["flow_matching"] = peer(True, REFERENCE_TOL).values
                for name, run in runs.items():
                    for norm in nd.ErrorNorm:
                        label = f"{name} ({norm.value})"
                        timings[label, trace_name] = nfdm_timing(
                            run, test_std, trace, args.tol, norm
                        )
                    if trace_name == "exact":
                        references[name] = nfdm_timing(
                            run, test_std, trace, REFERENCE_TOL, nd.ErrorNorm.EXAMPLE_MAX
                        ).values
            for (label, trace_name), timing in timings.items():
                if trace_name == "exact":
                    reference = references[label.split(" (")[0]]
                    timing.error = float(np.mean(np.abs(timing.values - reference)))
                rows.append(timing.row(label, dim, trace_name, args.num))
            for trace_name in ("exact", "hutchinson"):
                fm = timings["nfdm-de FM (example-max)", trace_name].run_s
                fm_rms = timings["nfdm-de FM (batch-rms)", trace_name].run_s
                nfdm = timings["nfdm-de NFDM (example-max)", trace_name].run_s
                line = f"D={dim} {trace_name}: NFDM / own FM (example-max) = {nfdm / fm:.2f}"
                if ("flow_matching", trace_name) in timings:
                    peer = timings["flow_matching", trace_name].run_s
                    plain = timings["nfdm-de FM, plain MLP (batch-rms)", trace_name].run_s
                    line += (
                        f"; flow_matching / own FM = {peer / fm:.2f} (example-max), "
                        f"{peer / fm_rms:.2f} (batch-rms), {peer / plain:.2f} (plain MLP, "
                        "batch-rms) (> 1: this project faster)"
                    )
                ratios.append(line)
            print(f"D={dim} done", flush=True)
        simulation_free, phase = phase_step_ratio(workdir, args.phase_after)
    print(header)
    print("\n".join(rows))
    print()
    print("\n".join(ratios))
    print(
        f"\nDefault 2-D configuration, at the start of its likelihood phase: simulation-free "
        f"step {simulation_free * 1e3:.2f} ms, likelihood-phase step {phase * 1e3:.1f} ms "
        f"(ratio {phase / simulation_free:.0f}x)"
    )


if __name__ == "__main__":
    main()
