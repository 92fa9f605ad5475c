"""`nfdm-de sample` and `nfdm-de nll` end to end: tiny runs trained through the CLI, then sampled
and scored through CliRunner and one real subprocess; every bad input is one line and exit 1."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
TINY = ["--steps", "20", "--batch-size", "64", "--width", "16", "--depth", "1"]
TINY += ["--likelihood-steps", "0"]  # no likelihood phase: `nll` defaults to the bound


def _train(run_dir, *args):
    result = runner.invoke(app, ["train", "--run-dir", str(run_dir), *TINY, *args])
    assert result.exit_code == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # A stochastic NFDM (learnable forward, learned g) on 2-D rings, and a deterministic
    # flow-matching model (linear path, g = 0) on the integer-valued digits.
    stochastic = _train(root / "rings", "--data", "rings")
    deterministic = _train(
        root / "digits", "--data", "digits", "--forward", "linear", "--volatility", "zero"
    )
    return {"stochastic": stochastic, "deterministic": deterministic, "root": root}


def _invoke_json(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result


def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_sample_writes_data_units_plot_and_metrics(runs, tmp_path):
    run_dir = runs["stochastic"]
    reference = nd.load_dataset("rings", split="test", num=200)
    np.save(tmp_path / "ref.npy", reference)
    out, plot = tmp_path / "s.npy", tmp_path / "s.png"
    summary, _ = _invoke_json(
        ["sample", "--run-dir", str(run_dir), "--num", "200", "--out", str(out), "--plot",
         str(plot), "--trajectories", "--solver", "heun", "--steps", "10", "--reference",
         str(tmp_path / "ref.npy"), "--json"]
    )  # fmt: skip
    for key in ("num", "nfe", "seconds", "solver", "mmd", "energy_distance"):
        assert key in summary
    assert summary["num"] == 200 and summary["solver"] == "heun" and summary["nfe"] == 20
    assert math.isfinite(summary["mmd"]) and math.isfinite(summary["energy_distance"])
    samples = np.load(out)
    assert samples.shape == (200, 2) and np.all(np.isfinite(samples))
    # Mapped back to data units: the metric recomputed on the file agrees.
    energy = float(nd.energy_distance(jnp.asarray(samples), jnp.asarray(reference)))
    assert abs(energy - summary["energy_distance"]) <= 1e-4 * max(1.0, abs(energy))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_sde_fixed_steps_and_discrete_output(runs, tmp_path):
    summary, _ = _invoke_json(
        ["sample", "--run-dir", str(runs["stochastic"]), "--num", "16", "--sde", "--solver",
         "euler", "--steps", "5", "--out", str(tmp_path / "sde.npy"), "--json"]
    )  # fmt: skip
    assert summary["nfe"] == 5 and summary["accepted_steps"] == 5
    summary, _ = _invoke_json(
        ["sample", "--run-dir", str(runs["deterministic"]), "--num", "4", "--solver", "heun",
         "--steps", "3", "--json"]
    )  # fmt: skip
    assert summary["nfe"] == 6
    digits = np.load(summary["out"])
    assert digits.shape == (4, 64)
    assert np.all(digits == np.round(digits)) and digits.min() >= 0 and digits.max() <= 16


def test_nll_default_method_is_what_the_model_optimises(runs, tmp_path):
    base = ["nll", "--run-dir", str(runs["stochastic"]), "--data", "rings", "--num", "40",
            "--batch-size", "25", "--solver", "tsit5", "--steps", "8", "--json"]  # fmt: skip
    bound, result = _invoke_json(base)
    assert bound["method"] == "bound" and bound["num"] == 40
    for key in ("nll", "nll_stderr", "bpd", "nfe", "num", "seconds", "method", "trace", "solver"):
        assert key in bound
    assert "nll" in result.stderr  # the progress bar's label
    per_example = tmp_path / "pe.npy"
    both, both_result = _invoke_json([*base, "--method", "both", "--per-example", str(per_example)])
    assert both["method"] == "both" and both["default_method"] == "bound"
    assert both["nll"] == both["nll_bound"] == pytest.approx(bound["nll"], abs=1e-9)
    assert math.isfinite(both["nll_ode"]) and both["nll_ode_stderr"] > 0
    assert both["bpd_ode"] == pytest.approx(both["nll_ode"] / (2 * math.log(2)))
    values = np.load(per_example)
    assert values.shape == (40,) and np.mean(values) == pytest.approx(both["nll"])
    # Rings has a known density: the truth on the same held-out points, and the gap to it.
    held_out = nd.load_dataset("rings", split="test", num=40)
    truth = -np.mean([float(nd.get_dataset("rings").log_prob(jnp.asarray(p))) for p in held_out])
    assert both["true_nll"] == pytest.approx(truth, rel=1e-9)
    assert both["gap"] == pytest.approx(both["nll"] - truth, rel=1e-9)
    assert all(s in both_result.stderr for s in ("gap to the true NLL", "ODE NLL", "bound"))


def test_nll_corrects_for_the_data_transform(runs):
    run_dir = runs["stochastic"]
    summary, _ = _invoke_json(
        ["nll", "--run-dir", str(run_dir), "--data", "rings", "--num", "40", "--method", "ode",
         "--solver", "tsit5", "--steps", "8", "--json"]
    )  # fmt: skip
    run = nd.load_run(str(run_dir))
    x = nd.load_dataset("rings", split="test", num=40)
    z = run.transform.to_model(jnp.asarray(x, jnp.result_type(float)))
    estimate, stats = nd.log_likelihood(run.model, z, solver=nd._solve.dfx.Tsit5(), steps=8)
    expected = -float(jnp.mean(estimate.value)) - float(run.transform.log_det())
    assert summary["nll"] == pytest.approx(expected, abs=1e-4)
    assert summary["nfe"] == stats.nfe == 6 * 8 + 1


def test_solver_steps_and_its_hidden_alias(runs):
    base = ["nll", "--run-dir", str(runs["stochastic"]), "--data", "rings", "--num", "20",
            "--method", "ode", "--solver", "tsit5", "--json"]  # fmt: skip
    named, _ = _invoke_json([*base, "--solver-steps", "5"])
    alias, _ = _invoke_json([*base, "--steps", "5"])
    assert named["steps"] == alias["steps"] == 5 and named["nfe"] == alias["nfe"] == 6 * 5 + 1
    assert named["nll"] == alias["nll"]
    _fails_cleanly([*base[:-1], "--solver-steps", "5", "--steps", "6"], "disagree")
    for command in ("nll", "sample"):
        help_text = runner.invoke(app, [command, "--help"]).stdout
        assert "--solver-steps" in help_text and "--steps " not in help_text


def test_nll_error_norm_batch_rms(runs):
    base = ["nll", "--run-dir", str(runs["stochastic"]), "--data", "rings", "--num", "40",
            "--method", "ode", "--rtol", "1e-4", "--atol", "1e-4", "--json"]  # fmt: skip
    example, _ = _invoke_json(base)
    batch, _ = _invoke_json([*base, "--error-norm", "batch-rms"])
    assert example["error_norm"] == "example-max" and batch["error_norm"] == "batch-rms"
    assert batch["nfe"] <= example["nfe"]
    run = nd.load_run(str(runs["stochastic"]))
    z = run.transform.to_model(jnp.asarray(nd.load_dataset("rings", split="test", num=40)))
    estimate, stats = nd.log_likelihood(
        run.model, z, rtol=1e-4, atol=1e-4, error_norm=nd.ErrorNorm.BATCH_RMS
    )
    assert batch["nfe"] == stats.nfe
    expected = -float(jnp.mean(estimate.value)) - float(run.transform.log_det())
    assert batch["nll"] == pytest.approx(expected, abs=1e-4)


def test_nll_discrete_data_in_bits_per_dim(runs):
    summary, _ = _invoke_json(
        ["nll", "--run-dir", str(runs["deterministic"]), "--data", "digits", "--num", "20",
         "--json"]
    )  # fmt: skip
    assert summary["method"] == "ode" and summary["discrete"] and summary["dims"] == 64
    assert summary["bpd"] == pytest.approx(summary["nll"] / (64 * math.log(2)))
    assert math.isfinite(summary["nll"])


def test_bad_input_is_one_line_and_exit_1(runs, tmp_path):
    rings, digits = str(runs["stochastic"]), str(runs["deterministic"])
    nll = ["nll", "--run-dir", rings, "--data", "rings", "--num", "10"]
    _fails_cleanly([*nll, "--solver", "rk4"], "unknown ODE solver 'rk4'")
    _fails_cleanly([*nll, "--method", "ode", "--steps", "4", "--rtol", "1e-3"], "not both")
    _fails_cleanly([*nll, "--method", "ode", "--rtol", "0"], "rtol")
    _fails_cleanly([*nll, "--method", "ode", "--solver", "euler", "--atol", "1e-3"], "fixed-step")
    _fails_cleanly(["nll", "--run-dir", str(tmp_path), "--data", "rings"], "no nfdm-de checkpoint")
    _fails_cleanly(["nll", "--run-dir", digits, "--data", "rings"], "2 dimensions")
    _fails_cleanly(["nll", "--run-dir", digits, "--data", "digits", "--method", "bound"], "g = 0")
    _fails_cleanly(["sample", "--run-dir", rings, "--solver", "tsit5", "--sde"], "SDE")
    _fails_cleanly(["sample", "--run-dir", rings, "--steps", "4", "--atol", "1e-3"], "not both")
    _fails_cleanly(["sample", "--run-dir", str(tmp_path)], "no nfdm-de checkpoint")
    np.save(tmp_path / "ref3.npy", np.zeros((5, 3)))
    args = ["sample", "--run-dir", rings, "--reference", str(tmp_path / "ref3.npy")]
    _fails_cleanly(args, "3 dimensions")
    _fails_cleanly(["sample", "--run-dir", rings, "--trajectories"], "--plot")


def test_nll_in_a_real_subprocess(runs, tmp_path):
    # The fixture's run was written by this float64 test process; the child computes in float32,
    # so this also checks that a checkpoint loads across float precisions.
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_ENABLE_X64="0")
    # A file, so that both processes see the same points (generators differ across dtypes).
    data = tmp_path / "held_out.npy"
    np.save(data, nd.load_dataset("rings", split="test", num=30, seed=0).astype(np.float32))
    nll_args = ["nll", "--run-dir", str(runs["stochastic"]), "--data", str(data), "--num", "30",
                "--method", "ode", "--solver", "heun", "--steps", "4", "--json"]  # fmt: skip
    args = [sys.executable, "-m", "nfdm_de.cli.main", *nll_args]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["nfe"] == 8 and summary["num"] == 30 and math.isfinite(summary["nll"])
    in_process, _ = _invoke_json(nll_args)
    assert abs(summary["nll"] - in_process["nll"]) < 1e-3 * (1 + abs(in_process["nll"]))
