"""`nfdm-de train`: strings and files become a typed `TrainConfig` here, then `nfdm_de.train`.

Resolution order (later wins): built-in defaults (or, with --resume, the run's stored config),
then the `--config` TOML file, then the flags given on the command line.
"""

import datetime
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer

from cli._solvers import JsonOption


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist.")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"cannot read config file {str(path)!r}: {error}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if isinstance(value, dict) and name in ("model", "optim", "train"):
            for inner, inner_value in value.items():
                flat[inner.replace("-", "_")] = inner_value
        else:
            flat[name] = value
    import nfdm_de as nd

    known = set(nd.FLAT_SETTINGS) | {"run_dir"}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(
            f"config file {str(path)!r}: unknown key(s) {unknown}; expected some of "
            f"{sorted(known)}."
        )
    return flat


def _resolve(base, settings: dict[str, Any]):
    """`base` TrainConfig with the flat `settings` applied (a data path made absolute)."""
    import nfdm_de as nd

    enums = {
        "forward": nd.ForwardChoice,
        "volatility": nd.VolatilityChoice,
        "schedule": nd.ScheduleChoice,
        "forward_anchor": nd.AnchorChoice,
        "predictor_skip": nd.PredictorSkipChoice,
        "likelihood_trace": nd.TraceChoice,
    }
    for name, enum_type in enums.items():
        if name in settings and not isinstance(settings[name], enum_type):
            value = settings[name]
            try:
                settings = {**settings, name: enum_type(value)}
            except ValueError:
                choices = ", ".join(m.value for m in enum_type)
                raise ValueError(f"unknown {name} {value!r}; expected one of: {choices}.") from None
    for field in ("data", "source"):
        data = settings.get(field)
        if isinstance(data, str) and not nd.is_dataset_name(data):
            if nd.is_file_reference(data):
                settings = {**settings, field: os.path.abspath(data)}
            else:
                nd.get_dataset(data)  # raises the "unknown dataset" message
    return nd.update_config(base, settings)


def train(
    data: Annotated[
        str | None,
        typer.Option(
            help="Built-in dataset (rings, two-moons, digits, digits-images, ...), a .npy/.npz "
            "file (N, D), or images: IDX (.gz or raw), a CIFAR-10 directory or .bin batch, an "
            "ImageNet-style .npz, a uint8 .npy/.npz of rank 3-4."
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="Train a bridge from this source (dataset name or .npy/.npz file) to --data."
        ),
    ] = None,
    forward: Annotated[
        str | None,
        typer.Option(
            help="Forward process: neural-gaussian (default), linear, vp, learned-schedule, "
            "neural-flow."
        ),
    ] = None,
    volatility: Annotated[
        str | None, typer.Option(help="Volatility g(t): learned (default), constant, zero.")
    ] = None,
    curvature: Annotated[
        float | None, typer.Option(help="Weight of the NFDM-OT curvature penalty (default 0).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps of the simulation-free objective.")
    ] = None,
    likelihood_steps: Annotated[
        int | None,
        typer.Option(
            help="Then this many steps of maximum likelihood through the probability-flow ODE "
            "(vector data). Default: a tenth of --steps for continuous vector data of dimension "
            "<= 16 without --source or --curvature, else 0; 0 turns the phase off. Resume a "
            "finished run with more of them to fine-tune it."
        ),
    ] = None,
    likelihood_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the likelihood phase (3e-3).")
    ] = None,
    likelihood_batch: Annotated[
        int | None,
        typer.Option(
            help="Examples per likelihood-phase step (default: --batch-size); a step costs in "
            "proportion to it."
        ),
    ] = None,
    likelihood_trace: Annotated[
        str | None,
        typer.Option(
            help="Divergence in the likelihood phase's solves: auto (default: exact up to 4 "
            "dimensions, else hutchinson), exact (D JVPs) or hutchinson (one probe's JVP, "
            "unbiased; cheaper as D grows)."
        ),
    ] = None,
    likelihood_bound_weight: Annotated[
        float | None,
        typer.Option(
            help="The likelihood phase minimises ODE NLL + this weight x the simulation-free "
            "bound (0.01), which keeps the bound and SDE sampling from drifting; 0: the ODE "
            "NLL alone."
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Examples per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (AdamW).")] = None,
    width: Annotated[int | None, typer.Option(help="Hidden width of the MLPs.")] = None,
    depth: Annotated[int | None, typer.Option(help="Hidden layers of the MLPs.")] = None,
    forward_width: Annotated[
        int | None,
        typer.Option(help="Hidden width of the learnable forward process's network (default 48)."),
    ] = None,
    forward_depth: Annotated[
        int | None,
        typer.Option(help="Hidden layers of the learnable forward process's network (default 2)."),
    ] = None,
    input_octaves: Annotated[
        int | None,
        typer.Option(
            help="Sin/cos features of the predictor MLP's input at 1, 2, ..., 2^(n-1) (default 4; "
            "0 = none)."
        ),
    ] = None,
    forward_anchor: Annotated[
        str | None,
        typer.Option(
            help="Path the learnable Gaussian forward process is built around: mixed (default; "
            "a learned mixture of the two others), vp or linear."
        ),
    ] = None,
    predictor_skip: Annotated[
        str | None,
        typer.Option(
            help="Skip connection of the predictor: gaussian (default; the posterior mean on the "
            "forward process's reference path: NFDM's anchor without the network), "
            "gaussian-full (the same on the path at the data mean, the learnable process's "
            "log-scale correction included; for long simulation-free training) or linear "
            "((1 - t) z + (t + delta) NN)."
        ),
    ] = None,
    channels: Annotated[
        int | None, typer.Option(help="Base channels of the U-Nets (image data; default 8).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (model, data order, noise).")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run directory (default: runs/<data>-<forward>-<time>)."),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file of settings; flags given here override it.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --run-dir from its checkpoint.")
    ] = False,
    json_output: JsonOption = False,
    warmup: Annotated[int | None, typer.Option(help="Linear learning-rate warm-up steps.")] = None,
    schedule: Annotated[
        str | None, typer.Option(help="After warm-up: cosine (default) or constant.")
    ] = None,
    ema_decay: Annotated[float | None, typer.Option(help="Decay of the EMA weights.")] = None,
    forward_network_lr_scale: Annotated[
        float | None,
        typer.Option(
            help="Scale of the learnable Gaussian forward process's network updates (default 1; "
            "0 freezes it, leaving the learned anchor weight)."
        ),
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps.")] = None,
    keep: Annotated[int | None, typer.Option(help="Keep the last K checkpoints.")] = None,
    log_every: Annotated[int | None, typer.Option(help="Metrics line every N steps.")] = None,
    coordinator: Annotated[
        str | None,
        typer.Option(
            help="Multi-process: host:port of process 0 (or $NFDM_DE_COORDINATOR); see "
            "docs/training.md."
        ),
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(help="Multi-process: number of processes (or $NFDM_DE_NUM_PROCESSES)."),
    ] = None,
    process_id: Annotated[
        int | None,
        typer.Option(help="Multi-process: this process's id, 0-based (or $NFDM_DE_PROCESS_ID)."),
    ] = None,
) -> None:
    """Train an NFDM; write the config, checkpoints and metrics to the run directory."""
    import jax

    import nfdm_de as nd

    flags = {
        "data": data,
        "source": source,
        "forward": forward,
        "volatility": volatility,
        "curvature": curvature,
        "steps": steps,
        "likelihood_steps": likelihood_steps,
        "likelihood_lr": likelihood_lr,
        "likelihood_batch": likelihood_batch,
        "likelihood_trace": likelihood_trace,
        "likelihood_bound_weight": likelihood_bound_weight,
        "batch_size": batch_size,
        "lr": lr,
        "width": width,
        "depth": depth,
        "forward_width": forward_width,
        "forward_depth": forward_depth,
        "channels": channels,
        "input_octaves": input_octaves,
        "forward_anchor": forward_anchor,
        "predictor_skip": predictor_skip,
        "seed": seed,
        "warmup": warmup,
        "schedule": schedule,
        "ema_decay": ema_decay,
        "forward_network_lr_scale": forward_network_lr_scale,
        "save_every": save_every,
        "keep": keep,
        "log_every": log_every,
    }
    try:
        # Before any JAX computation: joining a multi-process run must precede backend setup.
        nd.initialize_distributed(coordinator, num_processes, process_id)
        settings = _read_toml(config) if config is not None else {}
        toml_run_dir = settings.pop("run_dir", None)
        if toml_run_dir is not None and not (isinstance(toml_run_dir, str) and toml_run_dir):
            raise ValueError(
                f"config file {str(config)!r}: run_dir must be a path (a string); got "
                f"{toml_run_dir!r}."
            )
        settings.update({k: v for k, v in flags.items() if v is not None})
        directory = run_dir if run_dir is not None else toml_run_dir
        base = nd.TrainConfig()
        if directory is not None and resume:
            stored = nd.read_run_config(os.fspath(directory))
            if stored is not None:
                base = stored
        resolved = _resolve(base, settings)
        if directory is None:
            if resume:
                raise ValueError("--resume needs --run-dir (the run to continue).")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = os.path.splitext(os.path.basename(resolved.data))[0]
            directory = os.path.join("runs", f"{name}-{resolved.model.forward.value}-{stamp}")
        directory = os.fspath(directory)
        result = nd.train(
            resolved,
            directory,
            resume=resume,
            progress=sys.stderr,
            log=lambda message: typer.echo(message, err=True),
        )
    except ValueError as error:
        message = " ".join(str(error).split())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(code=1) from None
    process_index = jax.process_index()
    done = result.steps - result.resumed_from
    if process_index == 0:  # only process 0 reports to people
        curvature_text = ""
        if resolved.model.curvature > 0 and "curvature" in result.final_terms:
            curvature_text = f" (curvature term {result.final_terms['curvature']:.4f})"
        typer.echo(
            f"trained {done} steps in {result.seconds:.1f} s; final loss "
            f"{result.final_loss:.4f}{curvature_text}; run saved in {result.run_dir}",
            err=True,
        )
    if json_output:
        summary = {
            "run_dir": result.run_dir,
            "steps": result.steps,
            "final_loss": result.final_loss,
            "final_terms": result.final_terms,
            "curvature_weight": resolved.model.curvature,
            "seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "checkpoint": result.checkpoint,
            "data": resolved.data,
            "source": resolved.source,
            "forward": resolved.model.forward.value,
            "volatility": resolved.model.volatility.value,
            "devices": result.devices,
            "processes": result.processes,
        }
        if result.processes > 1:
            summary["process_id"] = process_index
        typer.echo(json.dumps(summary))
