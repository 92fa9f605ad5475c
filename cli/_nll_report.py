"""What `nfdm-de nll` prints: the `--json` object, the human summary on stderr, and the
per-example file."""

import math

import typer

from ._solvers import atomic_save, json_number


def summary_of(results, headline, method: str, truth, dims: int, trace) -> dict:
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
        "method": method,
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


def write_per_example(path: str, results, headline) -> None:
    """.npy: the headline method's values; anything else: a CSV table, one column per method."""
    import numpy as np

    if path.endswith(".npy"):
        atomic_save(path, lambda f: np.save(f, results[headline].values))
        return
    columns = [headline] + [m for m in results if m is not headline]
    table = np.stack([results[m].values for m in columns], axis=1)
    header = ",".join(f"nll_{m.value}" for m in columns)
    atomic_save(path, lambda f: np.savetxt(f, table, delimiter=",", header=header, comments=""))


def report(results, truth, dims) -> None:
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
