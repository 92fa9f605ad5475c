"""Every failure of a command as one `error: ...` line on stderr and exit code 1.

Expected failures (bad flags, files, run directories) arrive as ValueError or OSError with a
message written for the user. Anything else (out of memory, an interrupted run, a bug) is turned
into one line as well; `NFDM_DE_DEBUG=1` re-raises it with its traceback.
"""

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import typer

DEBUG_VARIABLE = "NFDM_DE_DEBUG"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _is_out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, MemoryError) or any(
        marker in text for marker in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory")
    )


def describe(error: BaseException, memory_hint: str) -> str:
    """The one-line message for `error`; `memory_hint` names the options that lower memory."""
    if _is_out_of_memory(error):
        return f"out of memory ({_first_line(error)}); lower {memory_hint}."
    if isinstance(error, OSError):
        reason = error.strerror or _first_line(error)
        return f"{reason} ({error.filename!r})." if error.filename else f"{reason}."
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, RuntimeError):  # e.g. a solve that ran out of steps
        return _first_line(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; what was saved before stays as it was."
    return (
        f"unexpected {type(error).__name__}: {_first_line(error)} (set {DEBUG_VARIABLE}=1 for "
        "the traceback)"
    )


def one_line_errors(command: Callable[..., Any], *, memory_hint: str) -> Callable[..., Any]:
    """`command` with every exception it raises reported by `fail`."""

    @functools.wraps(command)
    def wrapped(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - the command-line boundary
            if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
                raise
            code = 130 if isinstance(error, KeyboardInterrupt) else 1
            message = " ".join(describe(error, memory_hint).split())
            typer.echo(f"error: {message}", err=True)
            if kwargs.get("json_output"):  # a --json caller parses stdout: one object there too
                typer.echo(json.dumps({"error": message}))
            raise typer.Exit(code=code) from None

    return wrapped
