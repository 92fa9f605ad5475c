"""`nfdm-de train`: flags and a TOML file become a typed `TrainConfig` (cli/_settings.py), then
`nfdm_de.train` runs it; this module reports the result."""

import datetime
import json
import os
import sys
from typing import Any

import typer

from . import _train_options as opt
from ._options import JsonOption
from ._progress import RichTrainProgress, interactive
from ._settings import read_toml, resolve

# The options that are not settings of the run.
_NOT_SETTINGS = ("run_dir", "config", "resume", "json_output", "coordinator", "num_processes")
_NOT_SETTINGS += ("process_id",)


def train(
    data: opt.DataOption = None,
    source: opt.SourceOption = None,
    forward: opt.ForwardOption = None,
    volatility: opt.VolatilityOption = None,
    curvature: opt.CurvatureOption = None,
    steps: opt.StepsOption = None,
    likelihood_steps: opt.LikelihoodStepsOption = None,
    likelihood_lr: opt.LikelihoodLrOption = None,
    likelihood_batch: opt.LikelihoodBatchOption = None,
    likelihood_trace: opt.LikelihoodTraceOption = None,
    likelihood_bound_weight: opt.LikelihoodBoundWeightOption = None,
    batch_size: opt.BatchSizeOption = None,
    lr: opt.LrOption = None,
    width: opt.WidthOption = None,
    depth: opt.DepthOption = None,
    forward_width: opt.ForwardWidthOption = None,
    forward_depth: opt.ForwardDepthOption = None,
    input_octaves: opt.InputOctavesOption = None,
    predictor_residual: opt.PredictorResidualOption = None,
    forward_anchor: opt.ForwardAnchorOption = None,
    predictor_skip: opt.PredictorSkipOption = None,
    channels: opt.ChannelsOption = None,
    seed: opt.SeedOption = None,
    run_dir: opt.RunDirOption = None,
    config: opt.ConfigOption = None,
    resume: opt.ResumeOption = False,
    json_output: JsonOption = False,
    warmup: opt.WarmupOption = None,
    schedule: opt.ScheduleOption = None,
    ema_decay: opt.EmaDecayOption = None,
    forward_network_lr_scale: opt.ForwardNetworkLrScaleOption = None,
    save_every: opt.SaveEveryOption = None,
    keep: opt.KeepOption = None,
    log_every: opt.LogEveryOption = None,
    coordinator: opt.CoordinatorOption = None,
    num_processes: opt.NumProcessesOption = None,
    process_id: opt.ProcessIdOption = None,
) -> None:
    """Train an NFDM; write the config, checkpoints and metrics to the run directory."""
    import jax

    import nfdm_de as nd

    flags = {k: v for k, v in locals().items() if k not in _NOT_SETTINGS and k in nd.FLAT_SETTINGS}
    # --predictor-residual's choice as the setting (a bool; None: automatic).
    given_residual = flags.pop("predictor_residual") is not None
    # Before any JAX computation: joining a multi-process run must precede backend setup.
    nd.initialize_distributed(coordinator, num_processes, process_id)
    settings = read_toml(config) if config is not None else {}
    toml_run_dir = settings.pop("run_dir", None)
    if toml_run_dir is not None and not (isinstance(toml_run_dir, str) and toml_run_dir):
        raise ValueError(
            f"config file {str(config)!r}: run_dir must be a path (a string); got {toml_run_dir!r}."
        )
    settings.update({k: v for k, v in flags.items() if v is not None})
    if given_residual:  # an explicit `auto` overrides a file's value
        settings["predictor_residual"] = opt.residual_setting(predictor_residual)
    directory = run_dir if run_dir is not None else toml_run_dir
    base = nd.TrainConfig()
    if directory is not None and resume:
        base = nd.read_run_config(os.fspath(directory)) or base
    resolved = resolve(base, settings)
    if directory is None:
        if resume:
            raise ValueError("--resume needs --run-dir (the run to continue).")
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = os.path.splitext(os.path.basename(resolved.data))[0]
        directory = os.path.join("runs", f"{name}-{resolved.model.forward.value}-{stamp}")
    if interactive():
        display = RichTrainProgress()
        progress, log = display, display.log
    else:
        progress, log = sys.stderr, (lambda message: typer.echo(message, err=True))
    result = nd.train(resolved, os.fspath(directory), resume=resume, progress=progress, log=log)
    if jax.process_index() == 0:  # only process 0 reports to people
        _report(result, resolved)
    if json_output:
        summary: dict[str, Any] = dict(
            run_dir=result.run_dir, steps=result.steps, final_loss=result.final_loss
        )
        summary.update(final_terms=result.final_terms, curvature_weight=resolved.model.curvature)
        summary.update(seconds=result.seconds, resumed_from=result.resumed_from)
        summary.update(checkpoint=result.checkpoint, data=resolved.data, source=resolved.source)
        summary.update(forward=resolved.model.forward.value)
        summary.update(volatility=resolved.model.volatility.value, devices=result.devices)
        summary.update(processes=result.processes)
        if result.processes > 1:
            summary["process_id"] = jax.process_index()
        typer.echo(json.dumps(summary))


def _report(result, config) -> None:
    curvature = ""
    if config.model.curvature > 0 and "curvature" in result.final_terms:
        curvature = f" (curvature term {result.final_terms['curvature']:.4f})"
    typer.echo(
        f"trained {result.steps - result.resumed_from} steps in {result.seconds:.1f} s; final "
        f"loss {result.final_loss:.4f}{curvature}; run saved in {result.run_dir}",
        err=True,
    )
