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
from typing import Annotated

import typer

from cli._solvers import (
    JsonOption,
    MaxStepsOption,
    atomic_save,
    check_chunks,
    fail,
    json_number,
    print_json,
    solver_from_name,
)

# t = u^3 puts samples where the bound's integrand lives (small t).
BOUND_TIME_POWER = 3.0


class Method(StrEnum):
    ode = "ode"
    bound = "bound"
    both = "both"


class Trace(StrEnum):
    exact = "exact"
    hutchinson = "hutchinson"


def _summarise(values):
    """Mean over examples and its standard error (the spread of the per-example estimates,
    which includes each estimator's own Monte Carlo noise)."""
    import numpy as np

    values = np.asarray(values, np.float64)
    stderr = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), stderr


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
            "the device count. Same --chunks, same NLL on any device count."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Held-out NLL (nats per example, data units) by the ODE and/or the variational bound."""
    try:
        import equinox as eqx
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import nfdm_de as nd

        if batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer; got {batch_size}.")
        if probes < 1:
            raise ValueError(f"--probes must be a positive integer; got {probes}.")
        check_chunks(chunks)
        # All local devices, each solving its own rows of every batch (docs/training.md,
        # "Scaling out").
        mesh = nd.data_mesh()
        devices = int(mesh.devices.size)
        num_chunks = devices if chunks is None else chunks
        if num_chunks % devices != 0:
            raise ValueError(f"--chunks {num_chunks} must be a multiple of the {devices} devices.")
        solver_object = solver_from_name(solver, sde=False)
        run = nd.load_run(os.fspath(run_dir))
        if run.source_transform is not None:
            raise ValueError(
                f"{str(run_dir)!r} holds a bridge (from {run.config.source!r}); `nfdm-de nll` "
                "scores unconditional NFDMs only."
            )
        model = run.model
        optimises_ode = model.is_deterministic or (
            (run.config.likelihood_steps or 0) > 0 and run.step > run.config.steps
        )
        default = Method.ode if optimises_ode else Method.bound
        chosen = method or default
        if chosen in (Method.bound, Method.both) and model.is_deterministic:
            raise ValueError(
                "this run's model is deterministic (g = 0): it has no variational bound; use "
                "--method ode."
            )
        # Validate solver settings before any data are read.
        if chosen in (Method.ode, Method.both):
            nd._solve.stepping(
                solver_object, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, sde=False
            )
        # The held-out set does not depend on --seed (which drives the estimators only).
        x = nd.load_dataset(data, split="test", num=num)
        if num is not None:
            x = x[:num]
        data_shape = tuple(model.data_shape)
        if len(data_shape) == 1:
            x = x.reshape(x.shape[0], -1)
            if x.shape[1:] != data_shape:
                raise ValueError(
                    f"data {data!r} have {x.shape[1]} dimensions per example; the model of "
                    f"{str(run_dir)!r} was trained on {math.prod(data_shape)}."
                )
        elif x.shape[1:] != data_shape:
            raise ValueError(
                f"data {data!r} have examples of shape {x.shape[1:]}; the model of "
                f"{str(run_dir)!r} was trained on images of shape {data_shape}."
            )
        dims = math.prod(data_shape)
        if run.num_levels is not None:
            # Checked here, before any output, so bad data is one line (not a half-drawn bar).
            levels = int(run.num_levels)
            low, high = float(x.min()), float(x.max())
            if not np.all(x == np.rint(x)) or low < 0 or high >= levels:
                raise ValueError(
                    f"data {data!r} must be integers in [0, {levels}) for this run "
                    f"(num_levels={levels}); got values in [{low:g}, {high:g}]."
                )
        if trace is None:
            # The exact trace costs D Jacobian-vector products per evaluation.
            trace = Trace.exact if dims <= 64 else Trace.hutchinson
        dequantization = None
        if run.num_levels is not None:
            # s = (y - shift) / scale with y = (x + u) / K: the run's transform as a dequantizer.
            scale = 1.0 / run.transform.scale
            dequantization = nd.Dequantization(
                num_levels=int(run.num_levels), scale=scale, shift=-run.transform.shift * scale
            )
            log_jacobian = 0.0
        else:
            log_jacobian = float(run.transform.log_det())
        trace_object = nd.ExactTrace() if trace is Trace.exact else nd.Hutchinson(num_probes=probes)
        methods = [Method.ode, Method.bound] if chosen is Method.both else [chosen]
        per_method = {m: [] for m in methods}
        stats = {}
        total = x.shape[0]
        typer.echo(
            f"NLL of {total} examples of {data} under {run_dir} (step {run.step}): "
            f"{', '.join(m.value for m in methods)}",
            err=True,
        )
        base = jr.key(seed)
        # Whole chunks per batch: the padding below fills the last chunk.
        size = -(-min(batch_size, total) // num_chunks) * num_chunks
        with typer.progressbar(length=total, label="nll", file=sys.stderr) as bar:
            for index, start in enumerate(range(0, total, size)):
                batch = x[start : start + size]
                count = batch.shape[0]
                # Pad a short last batch with repeats of its own rows: one compiled shape for
                # the whole stream, and repeats leave the batch's error norm (a max over
                # examples) unchanged. The extra rows are dropped below.
                batch = np.concatenate([batch, batch[np.arange(size - count) % count]])
                if dequantization is None:
                    batch = run.transform.to_model(jnp.asarray(batch, jnp.result_type(float)))
                else:
                    batch = jnp.asarray(np.rint(batch).astype(np.int32))
                key = jr.fold_in(base, index)
                for m in methods:
                    if m is Method.ode:
                        estimate, batch_stats = nd.log_likelihood(
                            model,
                            batch,
                            key=key,
                            trace=trace_object,
                            solver=solver_object,
                            rtol=rtol,
                            atol=atol,
                            steps=steps,
                            max_steps=max_steps,
                            dequantization=dequantization,
                            mesh=mesh,
                            num_chunks=num_chunks,
                        )
                        values = -(np.asarray(estimate.value)[:count] + log_jacobian)
                    else:
                        estimate, batch_stats = nd.variational_bound(
                            model,
                            batch,
                            key=key,
                            num_samples=bound_samples,
                            dequantization=dequantization,
                            mesh=mesh,
                            # Importance-sampled t: the same bound with a smaller standard
                            # error.
                            time_power=BOUND_TIME_POWER,
                        )
                        values = np.asarray(estimate.value)[:count] - log_jacobian
                    per_method[m].append(values)
                    batch_stats = eqx.tree_at(lambda st: st.num, batch_stats, count)
                    stats[m] = batch_stats if m not in stats else stats[m].combine(batch_stats)
                bar.update(count)
        results = {m: np.concatenate(v) for m, v in per_method.items()}
        headline = chosen if chosen is not Method.both else default
        nll_mean, nll_stderr = _summarise(results[headline])
        seconds = sum(s.seconds for s in stats.values())
        summary = {
            "nll": nll_mean,
            "nll_stderr": json_number(nll_stderr),
            "bpd": nll_mean / (dims * math.log(2)),
            "nfe": stats[headline].nfe,
            "num": total,
            "seconds": seconds,
            "method": chosen.value,
            "default_method": headline.value,
            "trace": trace.value if Method.ode in methods else None,
            "solver": solver if Method.ode in methods else None,
            "dims": dims,
            "discrete": dequantization is not None,
            "data": data,
            "run_dir": os.fspath(run_dir),
            "checkpoint_step": run.step,
            "devices": devices,
            "chunks": num_chunks,
        }
        if Method.ode in methods:
            summary["probes"] = probes if trace is Trace.hutchinson else None
            summary["steps"], summary["rtol"], summary["atol"] = steps, rtol, atol
        if chosen is Method.both:
            for m in methods:
                mean, stderr = _summarise(results[m])
                summary[f"nll_{m.value}"] = mean
                summary[f"nll_{m.value}_stderr"] = json_number(stderr)
                summary[f"bpd_{m.value}"] = mean / (dims * math.log(2))
                summary[f"nfe_{m.value}"] = stats[m].nfe
        # Built-in sets with a known density: the truth on the same points, for the gap.
        truth = None
        true_values = nd.true_nll(data, x)
        if true_values is not None:
            truth = _summarise(true_values)
            summary["true_nll"] = truth[0]
            summary["gap"] = nll_mean - truth[0]
        if per_example is not None:
            path = os.fspath(per_example)
            if path.endswith(".npy"):
                atomic_save(path, lambda tmp: np.save(tmp, results[headline]))
            else:
                columns = [headline] + [m for m in methods if m is not headline]
                table = np.stack([results[m] for m in columns], axis=1)
                header = ",".join(f"nll_{m.value}" for m in columns)
                atomic_save(
                    path,
                    lambda tmp: np.savetxt(tmp, table, delimiter=",", header=header, comments=""),
                )
            summary["per_example"] = path
    except (ValueError, RuntimeError, OSError) as error:
        fail(error)
    for m, values in results.items():
        mean, stderr = _summarise(values)
        stderr_text = "n/a" if stderr is None else f"{stderr:.4f}"
        label = {"ode": "ODE NLL", "bound": "bound  "}.get(m.value, m.value)
        gap_text = "" if truth is None else f", gap to the true NLL {mean - truth[0]:+.4f}"
        typer.echo(
            f"{label} {mean:.4f} +- {stderr_text} nats ({mean / (dims * math.log(2)):.4f} "
            f"bits/dim), NFE {stats[m].nfe:.0f}{gap_text}",
            err=True,
        )
    if truth is not None:
        typer.echo(f"true NLL {truth[0]:.4f} +- {truth[1]:.4f} nats", err=True)
    typer.echo(f"{seconds:.1f} s", err=True)
    if json_output:
        print_json(summary)
