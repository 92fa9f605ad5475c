"""`nfdm-de sample`: draw samples from a trained run (EMA weights), in the data's own units.

Options are parsed and checked here; the solve is `nfdm_de.sample` (or `nfdm_de.bridge_sample`
for a bridge), the figure `cli/_plots.py`."""

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from ._options import (
    AtolOption,
    ChunksOption,
    JsonOption,
    MaxStepsOption,
    RtolOption,
    RunDirOption,
    StepsAliasOption,
    StepsOption,
)
from ._progress import working
from ._sample_inputs import bridge_sources, class_model, draw, reference_points
from ._solvers import (
    atomic_save,
    check_chunks,
    check_output_path,
    check_seed,
    json_number,
    print_json,
    solver_from_name,
    solver_steps,
    warn_skipped,
)

SolverOption = Annotated[
    str | None,
    typer.Option(
        help="ODE: euler, heun, midpoint, ralston, bosh3, tsit5 (default), dopri5, dopri8. "
        "SDE (--sde): euler(-maruyama), heun, sra1, shark (default), sea."
    ),
]
SourceOption = Annotated[
    Path | None,
    typer.Option(
        help="Bridge runs: the source points to map, a .npy/.npz file (N, D; N replaces --num) "
        "or a built-in set's name (--num points of its test split)."
    ),
]
ReferenceOption = Annotated[
    str | None,
    typer.Option(
        help="Reference points in data units, a .npy/.npz file or a built-in dataset name (its "
        "test split, --num points): adds mmd and energy_distance."
    ),
]


def sample(
    run_dir: RunDirOption,
    num: Annotated[int, typer.Option(help="Number of samples.")] = 1000,
    source: SourceOption = None,
    solver: SolverOption = None,
    steps: StepsOption = None,
    steps_alias: StepsAliasOption = None,
    rtol: RtolOption = None,
    atol: AtolOption = None,
    sde: Annotated[bool, typer.Option("--sde", help="Solve the generative SDE.")] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Output .npy (default: RUN_DIR/samples.npy).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Figure (.png, .pdf, .svg): a scatter or an image grid.")
    ] = None,
    trajectories: Annotated[
        bool, typer.Option("--trajectories", help="Draw generative paths on the --plot (2-D).")
    ] = False,
    reference: ReferenceOption = None,
    label: Annotated[
        int | None,
        typer.Option(help="Class-conditional runs: draw from class K (required for them)."),
    ] = None,
    max_steps: MaxStepsOption = 4096,
    chunks: ChunksOption = None,
    json_output: JsonOption = False,
) -> None:
    """Sample a trained run with its EMA weights; write the samples (data units) as .npy."""
    import jax.random as jr
    import numpy as np

    import nfdm_de as nd

    steps = solver_steps(steps, steps_alias)
    check_chunks(chunks)
    check_seed(seed)
    if num < 1:
        raise ValueError(f"--num must be a positive integer; got {num}.")
    if trajectories and plot is None:
        raise ValueError("--trajectories draws on the --plot; give --plot FILE.png.")
    name = solver or ("shark" if sde else "tsit5")
    settings: dict[str, Any] = dict(
        solver=solver_from_name(name, sde=sde), steps=steps, rtol=rtol, atol=atol
    )
    settings.update(max_steps=max_steps, sde=sde)
    nd.check_solve_settings(**settings)
    run = nd.load_run(os.fspath(run_dir))
    warn_skipped(run)
    out_path = os.fspath(out) if out is not None else os.path.join(run_dir, "samples.npy")
    for path in (out_path, plot):
        if path is not None:
            check_output_path(os.fspath(path))
    if plot is not None:
        nd.figure_format(os.fspath(plot))
    conditions, num = bridge_sources(run, source, num, trajectories)
    model = class_model(run, label)
    reference_data = reference_points(reference, num, run)
    key = jr.key(seed)
    what = "mapping" if isinstance(run.model, nd.BridgeModel) else "sampling"
    mesh = nd.data_mesh()
    with working(f"{what} {num} from {run_dir} (step {run.step}) with {name}"):
        if isinstance(run.model, nd.BridgeModel):  # one solve per source point, on one device
            assert conditions is not None  # bridge_sources gives a bridge its points
            z, stats = nd.bridge_sample(run.model, conditions, key=key, **settings)
            devices = used_chunks = 1
        else:
            assert isinstance(model, nd.NFDM)
            z, stats = nd.sample(model, num, key=key, mesh=mesh, num_chunks=chunks, **settings)
            devices = int(mesh.devices.size)
            used_chunks = chunks or devices
    samples = run.to_data_units(z)
    atomic_save(out_path, lambda f: np.save(f, samples))
    summary: dict[str, Any] = dict(
        num=num, nfe=stats.nfe, seconds=stats.seconds, solver=name, sde=sde
    )
    summary.update(steps=steps, rtol=rtol, atol=atol, accepted_steps=stats.accepted_steps)
    summary.update(rejected_steps=stats.rejected_steps, out=out_path, run_dir=os.fspath(run_dir))
    summary.update(checkpoint_step=run.step, devices=devices, chunks=used_chunks, label=label)
    line = f"{num} samples -> {out_path}; NFE {stats.nfe:.0f} per sample, {stats.seconds:.2f} s"
    if reference_data is not None:
        flat = samples.reshape(num, -1)
        summary["mmd"] = json_number(nd.mmd(flat, reference_data))
        summary["energy_distance"] = json_number(nd.energy_distance(flat, reference_data))
        line += f"; MMD^2 {summary['mmd']:.4g}, energy distance {summary['energy_distance']:.4g}"
    if plot is not None:
        title = f"{run_dir} step {run.step}: {name}{' SDE' if sde else ''}, NFE {stats.nfe:.0f}"
        if label is not None:
            title += f", class {label}"
        sources = None
        if conditions is not None and run.source_transform is not None:
            sources = np.asarray(run.source_transform.from_model(conditions), np.float64)
        draw(
            run,
            os.fspath(plot),
            samples,
            reference_data,
            trajectories,
            key,
            settings,
            title,
            sources,
            model,
        )
        summary["plot"] = os.fspath(plot)
    typer.echo(line, err=True)
    if json_output:
        print_json(summary)
