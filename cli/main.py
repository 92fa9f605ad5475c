"""`nfdm-de`: the Typer application. Each command lives in its own module and registers here."""

import typer

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


app.command(name="train")(_train)
app.command(name="sample")(_sample)
app.command(name="nll")(_nll)


@app.command()
def version() -> None:
    """Print the nfdm-de version."""
    import nfdm_de

    typer.echo(nfdm_de.__version__)


if __name__ == "__main__":
    app()
