"""`nfdm-de sample`: draw samples from a trained run (EMA weights), in the data's own units."""

import os
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

_TRAJECTORY_PATHS = 64


def _to_data_units(run, z):
    """Model space -> data units; integer data in [0, K) come back as integers."""
    import numpy as np

    x = np.asarray(run.transform.from_model(z), dtype=np.float64)
    if run.num_levels is not None:
        x = np.clip(np.floor(x * run.num_levels), 0, run.num_levels - 1)
    return x


def _plot(path, samples, reference, trajectories, num_levels=None):
    import math

    import numpy as np

    if samples.ndim == 4:  # images (N, H, W, C), integer levels: the library's grid writer
        import nfdm_de as nd

        channels = samples.shape[-1]
        if channels not in (1, 3):
            raise ValueError(f"--plot draws images with 1 or 3 channels; got {channels}.")
        count = min(64, samples.shape[0])
        nd.save_image_grid(
            np.rint(samples[:count]).astype(np.uint8), path, num_levels=num_levels or 256
        )
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dim = samples.shape[1]
    side = math.isqrt(dim)
    if dim == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        if reference is not None:
            ax.scatter(*reference[:, :2].T, s=2, alpha=0.3, c="tab:gray", label="reference")
        if trajectories is not None:
            for k in range(trajectories.shape[1]):
                ax.plot(*trajectories[:, k].T, lw=0.6, alpha=0.6, c="tab:orange")
        ax.scatter(*samples.T, s=2, alpha=0.5, c="tab:blue", label="samples")
        ax.set_aspect("equal")
        if reference is not None:
            ax.legend(loc="upper right", markerscale=4)
    elif side * side == dim:
        count = min(64, samples.shape[0])
        cols = math.ceil(math.sqrt(count))
        rows = math.ceil(count / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows))
        for k, ax in enumerate(np.atleast_1d(axes).ravel()):
            ax.axis("off")
            if k < count:
                ax.imshow(samples[k].reshape(side, side), cmap="gray")
    else:
        raise ValueError(
            f"--plot draws 2-D data (a scatter) or square images; the data have {dim} dimensions."
        )
    fig.tight_layout()
    from nfdm_de._image_io import figure_format

    fmt = figure_format(path)
    atomic_save(path, lambda f: fig.savefig(f, dpi=120, format=fmt))
    plt.close(fig)


def sample(
    run_dir: Annotated[Path, typer.Option(help="Run directory written by `nfdm-de train`.")],
    num: Annotated[int, typer.Option(help="Number of samples.")] = 1000,
    source: Annotated[
        Path | None,
        typer.Option(
            help="Bridge runs: .npy/.npz of source points (N, D) to map to the target (N ignores "
            "--num)."
        ),
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="ODE: euler, heun, midpoint, ralston, bosh3, tsit5 (default), dopri5, dopri8. "
            "SDE (--sde): euler(-maruyama), heun, sra1, shark (default), sea."
        ),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Fixed uniform grid of N steps (exclusive with tolerances).")
    ] = None,
    rtol: Annotated[float | None, typer.Option(help="Adaptive relative tolerance.")] = None,
    atol: Annotated[float | None, typer.Option(help="Adaptive absolute tolerance.")] = None,
    sde: Annotated[
        bool, typer.Option("--sde", help="Solve the generative SDE instead of the ODE.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Output .npy (default: <run-dir>/samples.npy).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="PNG: a scatter for 2-D data, an image grid for images.")
    ] = None,
    trajectories: Annotated[
        bool,
        typer.Option("--trajectories", help="Draw generative paths on the --plot (2-D data)."),
    ] = False,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Reference points in data units, a .npy/.npz file or a built-in dataset name "
            "(its test split, --num points): adds mmd and energy_distance."
        ),
    ] = None,
    max_steps: MaxStepsOption = 4096,
    chunks: Annotated[
        int | None,
        typer.Option(
            help="Independent solves the samples are split into (default: one per device); "
            "a multiple of the device count. The same --chunks draws the same noise and the "
            "same step sizes on any device count: samples agree to float rounding (float32 "
            "adaptive solves: ~1e-4), not bit for bit."
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Sample a trained run with its EMA weights; write the samples (data units) as .npy."""
    try:
        import jax.numpy as jnp
        import jax.random as jr
        import numpy as np

        import nfdm_de as nd

        if num < 1:
            raise ValueError(f"--num must be a positive integer; got {num}.")
        check_chunks(chunks)
        check_seed(seed)
        if plot is not None:
            from nfdm_de._image_io import figure_format

            figure_format(os.fspath(plot))
        if trajectories and plot is None:
            raise ValueError("--trajectories draws on the --plot; give --plot FILE.png.")
        name = solver or ("shark" if sde else "tsit5")
        solver_object = solver_from_name(name, sde=sde)
        reference_data = None
        if reference is not None:
            reference_data = nd.load_dataset(reference, split="test", num=num)
            reference_data = reference_data.reshape(reference_data.shape[0], -1)
        run = nd.load_run(os.fspath(run_dir))
        warn_skipped(run)
        dim = int(np.prod(run.model.data_shape))
        if reference_data is not None and reference_data.shape[1] != dim:
            raise ValueError(
                f"reference data have {reference_data.shape[1]} dimensions per example; the "
                f"model's data have {dim}."
            )
        out_path = os.fspath(out) if out is not None else os.path.join(run_dir, "samples.npy")
        for path in (out_path, plot):
            if path is not None:
                check_output_path(os.fspath(path))
        if num * dim >= 2**31:
            raise ValueError(
                f"--num {num} x {dim} dimensions exceeds the 2**31 values one array can hold; "
                "sample in several calls with other --seed values."
            )
        if trajectories and dim != 2:
            raise ValueError(f"--trajectories needs 2-D data; the data have {dim} dimensions.")
        settings: dict[str, Any] = dict(
            solver=solver_object, steps=steps, rtol=rtol, atol=atol, sde=sde, max_steps=max_steps
        )
        # Settings errors before any work starts (and before the progress line).
        nd.check_solve_settings(
            solver_object, steps=steps, rtol=rtol, atol=atol, max_steps=max_steps, sde=sde
        )
        key = jr.key(seed)
        model = run.model
        source_transform = run.source_transform
        is_bridge = source_transform is not None
        if source is not None and not is_bridge:
            raise ValueError(
                f"--source maps source points through a bridge, but {str(run_dir)!r} holds an "
                "NFDM (train one with `nfdm-de train --data TARGET --source SOURCE`)."
            )
        if is_bridge and source is None:
            raise ValueError(
                f"{str(run_dir)!r} holds a bridge from {run.config.source!r}: give --source "
                "FILE.npy with the source points to map."
            )
        if trajectories and is_bridge:
            raise ValueError("--trajectories is not supported for bridges.")
        c = None  # a bridge's source points, in its model space
        if source_transform is not None and source is not None:  # a bridge has a --source
            source_points = nd.load_dataset(os.fspath(source))
            if source_points.shape[1] != dim:
                raise ValueError(
                    f"--source points have {source_points.shape[1]} dimensions per example; the "
                    f"bridge's data have {dim}."
                )
            num = source_points.shape[0]
            c = source_transform.to_model(jnp.asarray(source_points, jnp.result_type(float)))
        typer.echo(
            f"{'mapping' if is_bridge else 'sampling'} {num} from {run_dir} (step {run.step}) "
            f"with {name}{' SDE' if sde else ' ODE'}",
            err=True,
        )
        # All local devices, each solving its own rows (docs/training.md, "Scaling out"); a
        # bridge maps its source points one solve each, on one device.
        mesh = nd.data_mesh()
        if isinstance(model, nd.BridgeModel):
            if c is None:
                raise ValueError("a bridge run needs its source points (--source FILE.npy).")
            z, stats = nd.bridge_sample(model, key, c, **settings)
        else:
            z, stats = nd.sample(model, key, num, mesh=mesh, num_chunks=chunks, **settings)
        samples = _to_data_units(run, z)
        atomic_save(out_path, lambda f: np.save(f, samples))
        summary = {
            "num": num,
            "nfe": stats.nfe,
            "seconds": stats.seconds,
            "solver": name,
            "sde": sde,
            "steps": steps,
            "rtol": rtol,
            "atol": atol,
            "accepted_steps": stats.accepted_steps,
            "rejected_steps": stats.rejected_steps,
            "out": out_path,
            "run_dir": os.fspath(run_dir),
            "checkpoint_step": run.step,
            "devices": 1 if is_bridge else int(mesh.devices.size),
            "chunks": 1 if is_bridge else (chunks or int(mesh.devices.size)),
        }
        if reference_data is not None:
            flat = samples.reshape(num, -1)
            summary["mmd"] = json_number(nd.mmd(flat, reference_data))
            summary["energy_distance"] = json_number(nd.energy_distance(flat, reference_data))
        if plot is not None:
            paths = None
            if trajectories and isinstance(model, nd.NFDM):  # bridges were refused above
                count = min(num, _TRAJECTORY_PATHS)
                _, path, _ = nd.sample_trajectories(model, key, count, **settings)
                paths = _to_data_units(run, path.reshape(-1, dim)).reshape(-1, count, dim)
            _plot(os.fspath(plot), samples, reference_data, paths, run.num_levels)
            summary["plot"] = os.fspath(plot)
    except (ValueError, OSError) as error:
        fail(error)
    line = f"{num} samples -> {out_path}; NFE {stats.nfe:.0f} per sample, {stats.seconds:.2f} s"
    if "mmd" in summary:
        line += f"; MMD^2 {summary['mmd']:.4g}, energy distance {summary['energy_distance']:.4g}"
    typer.echo(line, err=True)
    if json_output:
        print_json(summary)
