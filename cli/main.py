"""`nfdm-de`: the Typer application. Each command lives in its own module and registers here."""

import typer

from cli._errors import one_line_errors
from cli.nll import nll as _nll
from cli.sample import sample as _sample
from cli.train import train as _train

app = typer.Typer(
    name="nfdm-de",
    help="Neural Flow Diffusion Models: train, sample, and measure likelihoods.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Neural Flow Diffusion Models in JAX."""


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


if __name__ == "__main__":
    app()
