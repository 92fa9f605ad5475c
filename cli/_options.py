"""The options of `sample` and `nll`, declared once (`train`'s are in cli/_train_options.py)."""

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

RunDirOption = Annotated[Path, typer.Option(help="Run directory written by `nfdm-de train`.")]
StepsOption = Annotated[
    int | None,
    typer.Option(
        "--solver-steps",
        help="Solve on a fixed uniform grid of N solver steps (exclusive with tolerances).",
    ),
]
# `--steps`: a hidden second name of --solver-steps (in `train`, --steps counts optimiser steps).
StepsAliasOption = Annotated[int | None, typer.Option("--steps", hidden=True)]
RtolOption = Annotated[
    float | None, typer.Option(help="Adaptive relative tolerance (default 1e-5; SDE 1e-3).")
]
AtolOption = Annotated[
    float | None, typer.Option(help="Adaptive absolute tolerance (default 1e-5; SDE 1e-3).")
]
MaxStepsOption = Annotated[int, typer.Option(help="Step budget of an adaptive solve.")]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object (last stdout line).")
]
ChunksOption = Annotated[
    int | None,
    typer.Option(
        help="Independent solves per batch (default: one per device); a multiple of the device "
        "count. The same --chunks takes the same steps with the same noise on any device "
        "count: results agree to float rounding (float32 adaptive solves: ~1e-4), not bit for "
        "bit."
    ),
]


# --- nll ---


class Method(StrEnum):
    ode = "ode"
    bound = "bound"
    both = "both"


class Trace(StrEnum):
    exact = "exact"
    hutchinson = "hutchinson"


class ErrorNormName(StrEnum):
    example_max = "example-max"
    batch_rms = "batch-rms"


ErrorNormOption = Annotated[
    ErrorNormName,
    typer.Option(
        help="How an adaptive step's error is measured over a batch: example-max (every "
        "example within the tolerance) or batch-rms (the RMS over the batch, close to "
        "torchdiffeq's: fewer steps, single examples may exceed it).",
    ),
]


DataOption = Annotated[
    str,
    typer.Option(
        help="Built-in dataset name (its test split), a .npy/.npz file (N, D), or image data (a "
        "CIFAR-10 directory gives its test batch)."
    ),
]
MethodOption = Annotated[
    Method | None,
    typer.Option(
        help="ode, bound or both (default: what the model optimises: the bound when g > 0, the "
        "ODE NLL when g = 0 or after a likelihood phase)."
    ),
]
TraceOption = Annotated[
    Trace | None,
    typer.Option(
        help="Divergence of the ODE: exact or hutchinson (default: exact up to 64 dimensions, "
        "hutchinson above, e.g. images)."
    ),
]
NllSolverOption = Annotated[
    str,
    typer.Option(help="ODE solver: euler, heun, midpoint, ralston, bosh3, tsit5, dopri5, dopri8."),
]
PerExampleOption = Annotated[
    Path | None,
    typer.Option(help="Write each example's NLL: .npy (the `nll` values) or a CSV table."),
]
