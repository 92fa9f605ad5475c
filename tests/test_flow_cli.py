"""`--forward neural-flow` end to end through the CLI: train a tiny run, then score it."""

import json
import math

import pytest
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app

runner = CliRunner()


@pytest.mark.slow
def test_train_then_nll_with_neural_flow(tmp_path):
    # Slow (~40-55 s, nearly all compilation): the CLI builds the reference flow (four unrolled
    # coupling layers of width 64), which no flag shrinks, and compiles its training step and
    # its bound. No likelihood phase: `test_ml.py` runs a phase step on a small flow.
    run_dir = tmp_path / "flow"
    result = runner.invoke(
        app,
        ["train", "--data", "two-moons", "--forward", "neural-flow", "--steps", "10",
         "--likelihood-steps", "0", "--batch-size", "32", "--width", "8", "--depth", "1",
         "--run-dir", str(run_dir), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["forward"] == "neural-flow" and math.isfinite(summary["final_loss"])
    run = nd.load_run(str(run_dir))
    assert isinstance(run.model.forward, nd.NeuralFlow)
    assert run.config.model.forward is nd.ForwardChoice.NEURAL_FLOW
    result = runner.invoke(
        app,
        ["nll", "--run-dir", str(run_dir), "--data", "two-moons", "--num", "16",
         "--method", "bound", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    nll = json.loads(result.stdout.strip().splitlines()[-1])
    assert nll["method"] == "bound" and math.isfinite(nll["nll"])
