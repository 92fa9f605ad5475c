"""`nfdm-de`: the Typer application. Each command lives in its own module and registers here."""

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._errors import one_line_errors
from .nll import nll as _nll
from .sample import sample as _sample
from .train import train as _train

app = typer.Typer(
    name="nfdm-de",
    help="Neural Flow Diffusion Models: train, sample, and measure likelihoods.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


CACHE_VARIABLE = "NFDM_DE_COMPILE_CACHE"


def compile_cache_dir() -> Path:
    """Where the CLI keeps JAX's persistent compilation cache: $NFDM_DE_COMPILE_CACHE, else
    $XDG_CACHE_HOME/nfdm-de/jax (~/.cache/nfdm-de/jax)."""
    if os.environ.get(CACHE_VARIABLE):
        return Path(os.environ[CACHE_VARIABLE])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nfdm-de" / "jax"


def _print_version(value: bool | None) -> None:
    if value:
        import importlib.metadata

        try:
            typer.echo(importlib.metadata.version("nfdm-de"))
        except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
            import nfdm_de

            typer.echo(nfdm_de.__version__)
        raise typer.Exit()


@app.callback()
def main(
    no_compile_cache: Annotated[
        bool,
        typer.Option(
            "--no-compile-cache",
            help="Do not keep compiled programs between runs (default: kept in "
            "$NFDM_DE_COMPILE_CACHE or ~/.cache/nfdm-de/jax; a second run starts in seconds).",
        ),
    ] = False,
    version: Annotated[
        bool | None,  # None from Typer when the flag is absent (an eager option)
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Neural Flow Diffusion Models in JAX."""
    del version
    # A cache the user chose (JAX's own variable) is kept. JAX reads the variable when it is
    # imported, which importing `nfdm_de.cli` has done: its configuration is set too (it takes
    # effect at the first compilation).
    if not no_compile_cache and os.environ.get(CACHE_VARIABLE) != "0":
        directory = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(compile_cache_dir()))
        import jax

        jax.config.update("jax_compilation_cache_dir", directory)


# Every failure of a command ends as one `error: ...` line (cli/_errors.py); out of memory
# names the options that lower it.
app.command(name="train")(
    one_line_errors(_train, memory_hint="--batch-size, --width/--depth or --likelihood-batch")
)
app.command(name="sample")(
    one_line_errors(_sample, memory_hint="--num (sample in several calls with other --seed values)")
)
app.command(name="nll")(one_line_errors(_nll, memory_hint="--batch-size"))


@app.command()
def version() -> None:
    """Print the nfdm-de version."""
    import nfdm_de

    typer.echo(nfdm_de.__version__)


def run(argv: list[str] | None = None) -> int:
    """The `nfdm-de` program: `app`, with a malformed command line (an unknown option, a value
    of the wrong type or outside an option's choices) reported as one `error: ...` line and
    exit code 2 instead of Click's usage box. Returns the exit code."""
    try:
        result = app(args=argv, prog_name="nfdm-de", standalone_mode=False)
    except typer.Abort:
        typer.echo("error: interrupted.", err=True)
        return 130
    except Exception as error:
        # Typer's usage errors (its bundled Click's `UsageError`, not exported by name) carry
        # exit code 2, a `format_message()` and the context of the command they concern.
        if getattr(error, "exit_code", None) != 2 or not hasattr(error, "format_message"):
            raise
        message = " ".join(str(error.format_message()).split())  # pyright: ignore[reportAttributeAccessIssue]
        if message:  # (none when a bare `nfdm-de` has printed the help instead)
            context = getattr(error, "ctx", None)
            command = context.command_path if context is not None else "nfdm-de"
            message = f"{message} (see '{command} --help')"
            typer.echo(f"error: {message}", err=True)
            arguments = sys.argv[1:] if argv is None else argv
            if "--json" in arguments:  # a --json caller parses stdout: one object there too
                typer.echo(json.dumps({"error": message}))
        return 2
    return result if isinstance(result, int) else 0


def entry_point() -> None:
    """The console script: `run` on the process's arguments."""
    raise SystemExit(run())


if __name__ == "__main__":
    entry_point()
