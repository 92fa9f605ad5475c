"""`nfdm-de nll`: held-out negative log-likelihood of a trained run, in nats per example in the
data's own units (docs/likelihood.md). The computation is `nfdm_de.evaluate_nll`; this module
parses and checks options, and `cli/_nll_report.py` formats the result.

`--method` defaults to the quantity the model optimises (`nfdm_de.default_nll_method`): the
variational bound for a stochastic model (g > 0), the probability-flow ODE NLL for a
deterministic one and for a run whose training ended with a likelihood phase. `--method both`
reports the two, labelled (`nll_ode`, `nll_bound`), with `nll` the default one.
"""

import math
import os
from typing import Annotated, Any

import typer

from ._nll_report import report, summary_of, write_per_example
from ._options import (
    AtolOption,
    ChunksOption,
    DataOption,
    ErrorNormName,
    ErrorNormOption,
    JsonOption,
    MaxStepsOption,
    Method,
    MethodOption,
    NllSolverOption,
    PerExampleOption,
    RtolOption,
    RunDirOption,
    StepsAliasOption,
    StepsOption,
    Trace,
    TraceOption,
)
from ._progress import ExamplesProgress
from ._solvers import (
    check_chunks,
    check_output_path,
    check_seed,
    print_json,
    solver_from_name,
    solver_steps,
    warn_skipped,
)


def nll(
    run_dir: RunDirOption,
    data: DataOption,
    method: MethodOption = None,
    trace: TraceOption = None,
    probes: Annotated[int, typer.Option(help="Hutchinson probes per example.")] = 1,
    solver: NllSolverOption = "dopri5",
    steps: StepsOption = None,
    steps_alias: StepsAliasOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = None,
    batch_size: Annotated[int, typer.Option(help="Examples per solve.")] = 1000,
    num: Annotated[int | None, typer.Option(help="Use the first N examples.")] = None,
    bound_samples: Annotated[int, typer.Option(help="(t, eps) pairs per example (bound).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed (probes, dequantization, bound).")] = 0,
    per_example: PerExampleOption = None,
    max_steps: MaxStepsOption = 4096,
    error_norm: ErrorNormOption = ErrorNormName.example_max,
    chunks: ChunksOption = None,
    json_output: JsonOption = False,
) -> None:
    """Held-out NLL (nats per example, data units) by the ODE and/or the variational bound."""
    import jax.random as jr

    import nfdm_de as nd

    if probes < 1:
        raise ValueError(f"--probes must be a positive integer; got {probes}.")
    steps = solver_steps(steps, steps_alias)
    check_chunks(chunks)
    check_seed(seed)
    if per_example is not None:
        check_output_path(os.fspath(per_example))
    run = nd.load_run(os.fspath(run_dir))
    warn_skipped(run)
    if run.source_transform is not None:
        raise ValueError(
            f"{str(run_dir)!r} holds a bridge (from {run.config.source!r}); `nfdm-de nll` scores "
            "NFDMs, not bridges."
        )
    default = nd.default_nll_method(run)
    methods = _methods(method) if method is not None else (default,)
    settings: dict[str, Any] = dict(
        solver=solver_from_name(solver, sde=False), rtol=rtol, atol=atol, steps=steps
    )
    settings.update(max_steps=max_steps, batch_size=batch_size, num_chunks=chunks)
    settings.update(error_norm=nd.ErrorNorm(error_norm.value))
    nd.check_evaluation(run, methods, **settings)
    dims = math.prod(run.model.data_shape)
    trace_object = nd.default_evaluation_trace(dims, probes)
    if trace is not None:
        trace_object = nd.ExactTrace() if trace is Trace.exact else nd.Hutchinson(probes)
    # The held-out set does not depend on --seed (which drives the estimators only).
    x = nd.check_examples(run, nd.load_dataset(data, split="test", num=num)[:num], f"data {data!r}")
    labels = nd.check_labels(run, nd.load_labels(data, num), len(x))
    names = ", ".join(m.value for m in methods)
    typer.echo(
        f"NLL of {len(x)} examples of {data} under {run_dir} (step {run.step}): {names}", err=True
    )
    with ExamplesProgress("nll", len(x)) as bar:
        results = nd.evaluate_nll(
            run,
            x,
            methods,
            key=jr.key(seed),
            trace=trace_object,
            bound_samples=bound_samples,
            progress=bar.update,
            labels=labels,
            **settings,
        )
    headline = default if len(methods) > 1 else methods[0]
    truth = nd.true_nll(data, x)
    chosen = (method or Method(default.value)).value
    summary = summary_of(results, headline, chosen, truth, dims, trace_object)
    devices = int(nd.data_mesh().devices.size)
    summary.update(solver=solver if nd.NLLMethod.ODE in results else None, data=data)
    summary.update(discrete=run.num_levels is not None, run_dir=os.fspath(run_dir))
    summary.update(checkpoint_step=run.step, devices=devices, chunks=chunks or devices)
    summary.update(conditional=labels is not None)
    if nd.NLLMethod.ODE in results:
        summary.update(steps=steps, rtol=rtol, atol=atol, error_norm=error_norm.value)
    if per_example is not None:
        write_per_example(os.fspath(per_example), results, headline)
        summary["per_example"] = os.fspath(per_example)
    report(results, truth, dims)
    if json_output:
        print_json(summary)


def _methods(method: Method):
    import nfdm_de as nd

    ode, bound = nd.NLLMethod.ODE, nd.NLLMethod.BOUND
    return {Method.ode: (ode,), Method.bound: (bound,), Method.both: (ode, bound)}[method]
