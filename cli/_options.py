"""Options more than one command declares, declared once."""

from pathlib import Path
from typing import Annotated

import typer

RunDirOption = Annotated[Path, typer.Option(help="Run directory written by `nfdm-de train`.")]
StepsOption = Annotated[
    int | None, typer.Option(help="Fixed uniform grid of N steps (exclusive with tolerances).")
]
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
