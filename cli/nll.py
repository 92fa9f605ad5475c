"""`nfdm-de nll`: held-out negative log-likelihood of a trained run, streamed in batches.

The NLL is in nats per example *in the data's own units*: the model-space log-density is
corrected by the run's data transform (its log-Jacobian), and integer data are dequantized with
the D log(scale) - D log K offset (docs/math.md, "Bits/dim"), giving a bound on the discrete NLL.

`--method` defaults to the quantity the model optimises: the variational bound for a
stochastic model (g > 0), the probability-flow ODE NLL for a deterministic one (g = 0) and for
any run whose training ended with a likelihood phase (`--likelihood-steps`).
`--method both` reports the two, labelled (`nll_ode`, `nll_bound`), with `nll` the default one.
"""

import math
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from cli._solvers import (
    JsonOption,
    MaxStepsOption,
    atomic_save,
    check_chunks,
    check_output_path,
    check_seed,
    fail,
    json_number,
    print_json,
    solver_from_name,
    warn_skipped,
)


class Method(StrEnum):
    ode = "ode"
    bound = "bound"
    both = "both"


class Trace(StrEnum):
    exact = "exact"
    hutchinson = "hutchinson"


def _methods(method: Method):
    import nfdm_de as nd

    ode, bound = nd.NLLMethod.ODE, nd.NLLMethod.BOUND
    return {Method.ode: (ode,), Method.bound: (bound,), Method.both: (ode, bound)}[method]


def nll(
    run_dir: Annotated[Path, typer.Option(help="Run directory written by `nfdm-de train`.")],
    data: Annotated[
        str,
        typer.Option(
            help="Built-in dataset name (its test split), a .npy/.npz file (N, D), or image "
            "data (a CIFAR-10 directory gives its test batch)."
        ),
    ],
    method: Annotated[
        Method | None,
        typer.Option(
            help="ode, bound or both (default: what the model optimises: the bound when g > 0, "
            "the ODE NLL when g = 0 or after a likelihood phase)."
        ),
    ] = None,
    trace: Annotated[
        Trace | None,
        typer.Option(
            help="Divergence of the ODE: exact or hutchinson (default: exact up to 64 "
            "dimensions, hutchinson above, e.g. images)."
        ),
    ] = None,
    probes: Annotated[int, typer.Option(help="Hutchinson probes per example.")] = 1,
    solver: Annotated[
        str,
        typer.Option(
            help="ODE solver: euler, heun, midpoint, ralston, bosh3, tsit5, dopri5, dopri8."
        ),
    ] = "dopri5",
    steps: Annotated[
        int | None, typer.Option(help="Fixed uniform grid of N steps (exclusive with tolerances).")
    ] = None,
    rtol: Annotated[float | None, typer.Option(help="Adaptive relative tolerance (1e-5).")] = None,
    atol: Annotated[float | None, typer.Option(help="Adaptive absolute tolerance (1e-5).")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per solve.")] = 1000,
    num: Annotated[
        int | None, typer.Option(help="Use the first N examples (built-in sets: draw N).")
    ] = None,
    bound_samples: Annotated[
        int, typer.Option(help="Monte Carlo (t, eps) pairs per example for the bound.")
    ] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (probes, dequantization, bound).")] = 0,
    per_example: Annotated[
        Path | None,
        typer.Option(help="Write each example's NLL: .npy (the `nll` values) or a CSV table."),
    ] = None,
    max_steps: MaxStepsOption = 4096,
    chunks: Annotated[
        int | None,
        typer.Option(
            help="Independent ODE solves per batch (default: one per device); a multiple of "
            "the device count. The same --chunks takes the same steps on any device count: the "
            "NLL agrees to float rounding, not bit for bit."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Held-out NLL (nats per example, data units) by the ODE and/or the variational bound."""
    try:
        import jax.random as jr

        import nfdm_de as nd

        if probes < 1:
            raise ValueError(f"--probes must be a positive integer; got {probes}.")
        check_chunks(chunks)
        check_seed(seed)
        if per_example is not None:
            check_output_path(os.fspath(per_example))
        solver_object = solver_from_name(solver, sde=False)
        run = nd.load_run(os.fspath(run_dir))
        warn_skipped(run)
        if run.source_transform is not None:
            raise ValueError(
                f"{str(run_dir)!r} holds a bridge (from {run.config.source!r}); `nfdm-de nll` "
                "scores unconditional NFDMs only."
            )
        default = nd.default_nll_method(run)
        methods = _methods(method) if method is not None else (default,)
        settings: dict[str, Any] = dict(solver=solver_object, rtol=rtol, atol=atol, steps=steps)
        settings.update(max_steps=max_steps, batch_size=batch_size, num_chunks=chunks)
        nd.check_evaluation(run, methods, **settings)
        dims = math.prod(run.model.data_shape)
        trace_object = None
        if trace is not None:
            trace_object = nd.ExactTrace() if trace is Trace.exact else nd.Hutchinson(probes)
        trace_object = trace_object or nd.default_evaluation_trace(dims, probes)
        # The held-out set does not depend on --seed (which drives the estimators only).
        x = nd.load_dataset(data, split="test", num=num)[:num]
        x = nd.check_examples(run, x, f"data {data!r}")
        typer.echo(
            f"NLL of {x.shape[0]} examples of {data} under {run_dir} (step {run.step}): "
            f"{', '.join(m.value for m in methods)}",
            err=True,
        )
        with typer.progressbar(length=x.shape[0], label="nll", file=sys.stderr) as bar:
            results = nd.evaluate_nll(
                run,
                x,
                methods,
                key=jr.key(seed),
                trace=trace_object,
                bound_samples=bound_samples,
                progress=bar.update,
                **settings,
            )
        headline = default if len(methods) > 1 else methods[0]
        truth = nd.true_nll(data, x)
        summary = _summary(results, headline, method, default, truth, dims, trace_object)
        devices = int(nd.data_mesh().devices.size)
        summary.update(
            solver=solver if nd.NLLMethod.ODE in results else None,
            discrete=run.num_levels is not None,
            data=data,
            run_dir=os.fspath(run_dir),
            checkpoint_step=run.step,
            devices=devices,
            chunks=chunks or devices,
        )
        if nd.NLLMethod.ODE in results:
            summary.update(steps=steps, rtol=rtol, atol=atol)
        if per_example is not None:
            _write_per_example(os.fspath(per_example), results, headline)
            summary["per_example"] = os.fspath(per_example)
    except (ValueError, OSError) as error:
        fail(error)
    _report(results, truth, dims)
    if json_output:
        print_json(summary)


def _summary(results, headline, method, default, truth, dims, trace) -> dict:
    """The `--json` object (headline NLL, each method's when several, the truth's gap)."""
    import nfdm_de as nd

    main = results[headline]
    summary = {
        "nll": main.mean,
        "nll_stderr": json_number(main.stderr),
        "bpd": main.bits_per_dim(dims),
        "nfe": main.stats.nfe,
        "num": len(main.values),
        "seconds": sum(r.stats.seconds for r in results.values()),
        "method": (method or Method(default.value)).value,
        "default_method": headline.value,
        "trace": None,
        "dims": dims,
    }
    ode = results.get(nd.NLLMethod.ODE)
    if ode is not None:
        summary["trace"] = "exact" if isinstance(trace, nd.ExactTrace) else "hutchinson"
        summary["probes"] = None if isinstance(trace, nd.ExactTrace) else trace.num_probes
    if len(results) > 1:
        for m, result in results.items():
            summary[f"nll_{m.value}"] = result.mean
            summary[f"nll_{m.value}_stderr"] = json_number(result.stderr)
            summary[f"bpd_{m.value}"] = result.bits_per_dim(dims)
            summary[f"nfe_{m.value}"] = result.stats.nfe
    if truth is not None:
        summary["true_nll"] = float(truth.mean())
        summary["gap"] = main.mean - summary["true_nll"]
        if len(results) > 1:
            for m, result in results.items():
                summary[f"gap_{m.value}"] = result.mean - summary["true_nll"]
    return summary


def _write_per_example(path: str, results, headline) -> None:
    """.npy: the headline method's values; anything else: a CSV table, one column per method."""
    import numpy as np

    if path.endswith(".npy"):
        atomic_save(path, lambda f: np.save(f, results[headline].values))
        return
    columns = [headline] + [m for m in results if m is not headline]
    table = np.stack([results[m].values for m in columns], axis=1)
    header = ",".join(f"nll_{m.value}" for m in columns)
    atomic_save(path, lambda f: np.savetxt(f, table, delimiter=",", header=header, comments=""))


def _report(results, truth, dims) -> None:
    seconds = 0.0
    for m, result in results.items():
        stderr = "n/a" if result.stderr is None else f"{result.stderr:.4f}"
        label = {"ode": "ODE NLL", "bound": "bound  "}[m.value]
        gap = "" if truth is None else f", gap to the true NLL {result.mean - truth.mean():+.4f}"
        typer.echo(
            f"{label} {result.mean:.4f} +- {stderr} nats ({result.bits_per_dim(dims):.4f} "
            f"bits/dim), NFE {result.stats.nfe:.0f}{gap}",
            err=True,
        )
        seconds += result.stats.seconds
    if truth is not None:
        stderr = float(truth.std(ddof=1) / math.sqrt(len(truth))) if len(truth) > 1 else 0.0
        typer.echo(f"true NLL {truth.mean():.4f} +- {stderr:.4f} nats", err=True)
    typer.echo(f"{seconds:.1f} s", err=True)
