"""Solver names -> Diffrax solver objects (the CLI is the only place strings become objects)."""

import json
import math
import os

import typer

ODE_SOLVER_NAMES = ("euler", "heun", "midpoint", "ralston", "bosh3", "tsit5", "dopri5", "dopri8")
SDE_SOLVER_NAMES = ("euler", "euler-maruyama", "heun", "sra1", "shark", "sea")


def solver_steps(steps: int | None, alias: int | None) -> int | None:
    """--solver-steps, or its hidden alias --steps; both at once must agree."""
    if steps is not None and alias is not None and steps != alias:
        raise ValueError(
            f"--solver-steps {steps} and --steps {alias} disagree; give --solver-steps alone."
        )
    return steps if steps is not None else alias


def check_chunks(chunks: int | None) -> None:
    """--chunks is a positive count when given (the device-multiple check needs the mesh)."""
    if chunks is not None and chunks < 1:
        raise ValueError(f"--chunks must be a positive integer; got {chunks}.")


def check_seed(seed: int) -> None:
    """--seed fits a PRNG key: an integer in [0, 2**63)."""
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an integer in [0, 2**63); got {seed}.")


def warn_skipped(run) -> None:
    """A line on stderr for each newer checkpoint `load_run` could not read and skipped."""
    for path, reason in run.skipped:
        typer.echo(
            f"warning: skipped unreadable checkpoint {path!r} ({reason}); using "
            f"{run.path!r} (step {run.step}).",
            err=True,
        )


def solver_from_name(name: str, *, sde: bool):
    import diffrax as dfx

    table = {
        "euler": dfx.Euler,
        "euler-maruyama": dfx.Euler,
        "heun": dfx.Heun,
        "midpoint": dfx.Midpoint,
        "ralston": dfx.Ralston,
        "bosh3": dfx.Bosh3,
        "tsit5": dfx.Tsit5,
        "dopri5": dfx.Dopri5,
        "dopri8": dfx.Dopri8,
        "sra1": dfx.SRA1,
        "shark": dfx.ShARK,
        "sea": dfx.SEA,
    }
    allowed = SDE_SOLVER_NAMES if sde else ODE_SOLVER_NAMES
    key = name.strip().lower()
    if key not in allowed:
        kind = "SDE (--sde)" if sde else "ODE"
        raise ValueError(f"unknown {kind} solver {name!r}; expected one of: {', '.join(allowed)}.")
    return table[key]()


def json_number(value):
    """JSON has no NaN or infinity: those become null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def print_json(summary: dict) -> None:
    typer.echo(json.dumps(summary))


def check_output_path(path: str) -> None:
    """A ValueError unless a file can be written at `path` (checked before any work starts)."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write {path!r}: it is a directory; name a file.")
    import nfdm_de._files

    nfdm_de._files.existing_directory_above(path, "write")


def atomic_save(path: str, write) -> None:
    """Write a file atomically to exactly `path` (whatever its extension): `write` receives a
    binary file object. A crash never leaves a half-written file where a good one was."""
    import nfdm_de as nd

    check_output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nd.atomic_write(path, write)
