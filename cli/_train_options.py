"""The options of `nfdm-de train`, one alias each (the command's signature lists them)."""

from pathlib import Path
from typing import Annotated

import typer

# The choices of the enum-valued settings, which each option's help lists (its metavar is
# CHOICE). Written out here (checked against the library's enums and the help texts by
# tests/test_cli_train.py) because importing the library would import JAX before `main` has set
# up its compilation cache.
CHOICES = {
    "forward": ("neural-gaussian", "linear", "vp", "learned-schedule", "neural-flow"),
    "volatility": ("learned", "constant", "zero"),
    "likelihood_trace": ("auto", "exact", "hutchinson"),
    "forward_anchor": ("linear", "vp", "mixed"),
    "predictor_skip": ("gaussian", "gaussian-full", "linear"),
    "predictor_residual": ("auto", "on", "off"),
    "schedule": ("cosine", "constant"),
}


DataOption = Annotated[
    str | None,
    typer.Option(
        show_default="rings",
        help="Built-in dataset (rings, two-moons, digits, digits-images, ...), a .npy/.npz "
        "file (N, D), or images: IDX (.gz or raw), a CIFAR-10 directory or .bin batch, an "
        "ImageNet-style .npz, a uint8 .npy/.npz of rank 3-4.",
    ),
]

SourceOption = Annotated[
    str | None,
    typer.Option(
        help="Train a bridge from this source (dataset name or .npy/.npz file) to --data."
    ),
]

ForwardOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="neural-gaussian",
        help="Forward process: neural-gaussian (default), linear, vp, learned-schedule, "
        "neural-flow.",
    ),
]

VolatilityOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="learned",
        help="Volatility g(t): learned (default), constant, zero.",
    ),
]

CurvatureOption = Annotated[
    float | None,
    typer.Option(show_default="0.0", help="Weight of the NFDM-OT curvature penalty (default 0)."),
]

StepsOption = Annotated[
    int | None,
    typer.Option(show_default="3000", help="Optimiser steps of the simulation-free objective."),
]

LikelihoodStepsOption = Annotated[
    int | None,
    typer.Option(
        help="Then this many steps of maximum likelihood through the probability-flow ODE "
        "(vector data). Default: a fifteenth of --steps for continuous vector data of dimension "
        "<= 16 without --source or --curvature, else 0; 0 turns the phase off. Resume a "
        "finished run with more of them to fine-tune it."
    ),
]

LikelihoodLrOption = Annotated[
    float | None,
    typer.Option(
        show_default="auto",
        help="Peak learning rate of the likelihood phase (default by the data's dimension: 3e-3 "
        "up to 4-D, 1e-2 above).",
    ),
]

LikelihoodBatchOption = Annotated[
    int | None,
    typer.Option(
        help="Examples per likelihood-phase step (default: --batch-size); a step costs in "
        "proportion to it."
    ),
]

LikelihoodTraceOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="auto",
        help="Divergence in the likelihood phase's solves: auto (default: exact up to 4 "
        "dimensions, else hutchinson), exact (D JVPs) or hutchinson (one probe's JVP, "
        "unbiased; cheaper as D grows).",
    ),
]

LikelihoodBoundWeightOption = Annotated[
    float | None,
    typer.Option(
        show_default="0.01",
        help="The likelihood phase minimises ODE NLL + this weight x the simulation-free "
        "bound (0.01), which keeps the bound and SDE sampling from drifting; 0: the ODE "
        "NLL alone.",
    ),
]

BatchSizeOption = Annotated[int | None, typer.Option(show_default="256", help="Examples per step.")]

LrOption = Annotated[
    float | None, typer.Option(show_default="0.006", help="Peak learning rate (AdamW).")
]

WidthOption = Annotated[
    int | None, typer.Option(show_default="128", help="Hidden width of the MLPs.")
]

DepthOption = Annotated[
    int | None, typer.Option(show_default="3", help="Hidden layers of the MLPs.")
]

ForwardWidthOption = Annotated[
    int | None,
    typer.Option(
        show_default="48",
        help="Hidden width of the learnable forward process's network (default 48).",
    ),
]

ForwardDepthOption = Annotated[
    int | None,
    typer.Option(
        show_default="2",
        help="Hidden layers of the learnable forward process's network (default 2).",
    ),
]

PredictorResidualOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="auto",
        help="The predictor MLP's hidden layers as normalised residual blocks: auto (default: "
        "on from 5-D to 8-D, off elsewhere), on or off.",
    ),
]

# --predictor-residual's choices, as the setting's value (None: automatic).
RESIDUAL_CHOICES = dict(zip(CHOICES["predictor_residual"], (None, True, False), strict=True))


def residual_setting(choice: str | None) -> bool | None:
    """The `predictor_residual` setting of a --predictor-residual choice (None: not given)."""
    if choice is None:
        return None
    if choice not in RESIDUAL_CHOICES:
        choices = ", ".join(RESIDUAL_CHOICES)
        raise ValueError(f"unknown predictor_residual {choice!r}; expected one of: {choices}.")
    return RESIDUAL_CHOICES[choice]


InputOctavesOption = Annotated[
    int | None,
    typer.Option(
        show_default="auto",
        help="Sin/cos features of the predictor MLP's input at 1, 2, ..., 2^(n-1) (0 = none; "
        "default by the data's dimension: 4 up to 4-D, 2 up to 8-D, 0 above).",
    ),
]

ForwardAnchorOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="mixed",
        help="Path the learnable Gaussian forward process is built around: mixed (default; "
        "a learned mixture of the two others), vp or linear.",
    ),
]

PredictorSkipOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="gaussian",
        help="Skip connection of the predictor: gaussian (default; the posterior mean on the "
        "forward process's reference path: NFDM's anchor without the network), "
        "gaussian-full (the same on the path at the data mean, the learnable process's "
        "log-scale correction included; for long simulation-free training) or linear "
        "((1 - t) z + (t + delta) NN).",
    ),
]

ChannelsOption = Annotated[
    int | None,
    typer.Option(show_default="8", help="Base channels of the U-Nets (image data; default 8)."),
]

SeedOption = Annotated[
    int | None, typer.Option(show_default="0", help="Random seed (model, data order, noise).")
]

RunDirOption = Annotated[
    Path | None,
    typer.Option(help="Run directory (default: runs/<data>-<forward>-<time>)."),
]

ConfigOption = Annotated[
    Path | None, typer.Option(help="TOML file of settings; flags given here override it.")
]

ResumeOption = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --run-dir from its checkpoint.")
]

WarmupOption = Annotated[
    int | None, typer.Option(show_default="200", help="Linear learning-rate warm-up steps.")
]

ScheduleOption = Annotated[
    str | None,
    typer.Option(
        metavar="CHOICE",
        show_default="cosine",
        help="After warm-up: cosine (default) or constant.",
    ),
]

EmaDecayOption = Annotated[
    float | None, typer.Option(show_default="0.999", help="Decay of the EMA weights.")
]

ForwardNetworkLrScaleOption = Annotated[
    float | None,
    typer.Option(
        show_default="1.0",
        help="Scale of the learnable Gaussian forward process's network updates (default 1; "
        "0 freezes it, leaving the learned anchor weight).",
    ),
]

SaveEveryOption = Annotated[
    int | None, typer.Option(show_default="1000", help="Checkpoint every N steps.")
]

KeepOption = Annotated[
    int | None, typer.Option(show_default="3", help="Keep the last K checkpoints.")
]

LogEveryOption = Annotated[
    int | None, typer.Option(show_default="100", help="Metrics line every N steps.")
]

CoordinatorOption = Annotated[
    str | None,
    typer.Option(
        help="Multi-process: host:port of process 0 (or $NFDM_DE_COORDINATOR); see "
        "docs/training.md."
    ),
]

NumProcessesOption = Annotated[
    int | None,
    typer.Option(help="Multi-process: number of processes (or $NFDM_DE_NUM_PROCESSES)."),
]

ProcessIdOption = Annotated[
    int | None,
    typer.Option(help="Multi-process: this process's id, 0-based (or $NFDM_DE_PROCESS_ID)."),
]
