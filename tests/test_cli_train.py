"""`nfdm-de train`: help, end-to-end runs (CliRunner and a real subprocess), every bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_train import TINY
from typer.testing import CliRunner

import nfdm_de as nd
from nfdm_de.cli.main import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _tiny_toml(path: Path, **changes) -> Path:
    """TINY (the shared test configuration) as a flat TOML file."""
    d = TINY.to_dict()
    flat = {**d["model"], **d["optim"], **{k: v for k, v in d.items() if not isinstance(v, dict)}}
    flat.update(changes)
    flat = {k: v for k, v in flat.items() if v is not None}  # TOML has no null (source = None)
    path.write_text("".join(f"{k.replace('_', '-')} = {json.dumps(v)}\n" for k, v in flat.items()))
    return path


def _fails_cleanly(args, match):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--data",
        "--forward",
        "--volatility",
        "--curvature",
        "--steps",
        "--batch-size",
        "--lr",
        "--width",
        "--depth",
        "--seed",
        "--run-dir",
        "--config",
        "--resume",
        "--json",
        "--likelihood-steps",
        "--likelihood-lr",
        "--likelihood-bound-weight",
        "--input-octaves",
        "--forward-anchor",
        "--predictor-skip",
        "--predictor-residual",
    ):
        assert flag in result.stdout


def test_end_to_end_cli_runner_with_toml_and_resume(tmp_path):
    config = _tiny_toml(tmp_path / "tiny.toml", steps=1000)
    run_dir = tmp_path / "run"
    args = ["train", "--config", str(config), "--steps", "20", "--run-dir", str(run_dir), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["run_dir"] == str(run_dir) and summary["steps"] == 20
    assert np.isfinite(summary["final_loss"]) and summary["seconds"] > 0
    assert "steps/s" in result.stderr  # the progress bar
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["steps"] == 20 and stored["model"]["width"] == 16  # flag beats TOML
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2
    assert nd.load_run(str(run_dir)).step == 20

    # Continue to 30 steps: only the flags given override the stored config.
    result = runner.invoke(
        app, ["train", "--run-dir", str(run_dir), "--resume", "--steps", "30", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 30 and summary["resumed_from"] == 20
    assert nd.load_run(str(run_dir)).config.steps == 30


def test_end_to_end_subprocess(tmp_path):
    run_dir = tmp_path / "run"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "nfdm_de.cli.main",
            "train",
            "--data",
            "two-moons",
            "--forward",
            "linear",
            "--volatility",
            "constant",
            "--width",
            "16",
            "--depth",
            "1",
            "--steps",
            "10",
            "--likelihood-steps",
            "0",
            "--batch-size",
            "16",
            "--run-dir",
            str(run_dir),
            "--json",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 10 and summary["run_dir"] == str(run_dir)
    assert summary["forward"] == "linear" and np.isfinite(summary["final_loss"])
    run = nd.load_run(str(run_dir))
    assert run.step == 10 and run.config.model.forward is nd.ForwardChoice.LINEAR


@pytest.fixture
def bad_files(tmp_path):
    np.save(tmp_path / "rank1.npy", np.zeros(5))
    np.save(tmp_path / "rank3.npy", np.zeros((2, 3, 4)))
    bad = np.zeros((4, 2))
    bad[1, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    bad[1, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = [1.0, 2.0], [3.0]
    np.save(tmp_path / "ragged.npy", ragged, allow_pickle=True)
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    return tmp_path


@pytest.mark.parametrize(
    "args, match",
    [
        (["--data", "{d}/missing.npy"], "does not exist"),
        (["--data", "{d}/garbage.npz"], "cannot read"),
        (["--data", "{d}/ragged.npy"], "cannot read"),
        (["--data", "{d}/nan.npy"], "NaN/inf"),
        (["--data", "{d}/inf.npy"], "NaN/inf"),
        (["--data", "{d}/rank1.npy"], "rank 2"),
        (["--data", "{d}/rank3.npy"], "rank 2"),
        (["--data", "no-such-set"], "unknown dataset 'no-such-set'"),
        (["--forward", "flow-ish"], "unknown forward 'flow-ish'"),
        (["--volatility", "loud"], "unknown volatility 'loud'"),
        (["--steps", "0"], "`steps` must be a positive integer"),
        (["--steps", "-5"], "`steps` must be a positive integer"),
        (["--batch-size", "0"], "`batch_size` must be a positive integer"),
        (["--batch-size", "-1"], "`batch_size` must be a positive integer"),
        (["--volatility", "zero"], "needs a curvature penalty > 0"),
        (["--forward", "learned-schedule", "--volatility", "zero"], "degenerates"),
        (["--resume"], "--resume needs --run-dir"),
        (["--forward-anchor", "curved"], "unknown forward_anchor 'curved'"),
        (["--predictor-skip", "full"], "unknown predictor_skip 'full'"),
        (["--likelihood-steps", "-1"], "`likelihood_steps` must be an integer >= 0"),
        (["--likelihood-lr", "0"], "`likelihood_lr` must be a finite number > 0"),
        (["--likelihood-bound-weight", "-1"], "`likelihood_bound_weight` must be a finite"),
        (["--input-octaves", "-1"], "`input_octaves` must be an integer in [0, 16]"),
        (["--predictor-residual", "yes"], "unknown predictor_residual 'yes'"),
        (["--data", "digits-images", "--likelihood-steps", "5"], "needs an NFDM on vector data"),
        (["--data", "digits-images", "--forward", "neural-flow"], "neural-flow forward process"),
        (["--config", "{d}/none.toml"], "does not exist"),
        (["--forward-network-lr-scale", "-1"], "`forward_network_lr_scale` must be a finite"),
        (
            ["--forward", "linear", "--forward-network-lr-scale", "0"],
            "applies to the network of the learnable Gaussian forward process",
        ),
    ],
)
def test_bad_input(args, match, bad_files):
    run_dir = bad_files / "run"
    args = [a.replace("{d}", str(bad_files)) for a in args]
    if "--resume" not in args:
        args += ["--run-dir", str(run_dir)]
    _fails_cleanly(args, match)
    assert not run_dir.exists()  # nothing was created


def test_bad_toml(tmp_path):
    (tmp_path / "a.toml").write_text("stepz = 3\n")
    _fails_cleanly(["--config", str(tmp_path / "a.toml")], "unknown key(s) ['stepz']")
    (tmp_path / "b.toml").write_text("steps = [\n")
    _fails_cleanly(["--config", str(tmp_path / "b.toml")], "cannot read config file")
    (tmp_path / "c.toml").write_text('steps = "many"\n')
    _fails_cleanly(["--config", str(tmp_path / "c.toml")], "`steps` must be int")


def test_existing_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    config = _tiny_toml(tmp_path / "tiny.toml", steps=2, save_every=2)
    assert (
        runner.invoke(app, ["train", "--config", str(config), "--run-dir", str(run_dir)]).exit_code
        == 0
    )
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    # The same or a different run without --resume.
    _fails_cleanly(["--config", str(config), "--run-dir", str(run_dir)], "already holds a run")
    _fails_cleanly(["--data", "rings", "--run-dir", str(run_dir)], "pass --resume to continue it")
    # --resume with a different architecture names the field.
    _fails_cleanly(
        ["--run-dir", str(run_dir), "--resume", "--width", "32"],
        "model.width: 16 (stored) vs 32 (given)",
    )
    # A non-empty directory that is not a run.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _fails_cleanly(["--run-dir", str(other)], "already holds other files")
    _fails_cleanly(["--run-dir", str(other), "--resume"], "holds no nfdm-de run")
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 1

    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_toml_tables_and_flag_precedence(tmp_path):
    from nfdm_de.cli._settings import read_toml, resolve

    path = tmp_path / "c.toml"
    path.write_text(
        'data = "spirals"\nsteps = 7\n[model]\nwidth = 8\ncurvature = 1\n'
        '[optim]\nlr = 0.5\nschedule = "constant"\n'
    )
    settings = read_toml(path)
    settings.update(steps=9)  # a flag given on the command line
    config = resolve(nd.TrainConfig(), settings)
    assert config.data == "spirals" and config.steps == 9
    assert config.model.width == 8 and config.model.curvature == 1.0
    assert config.optim.lr == 0.5 and config.optim.schedule is nd.ScheduleChoice.CONSTANT


def test_likelihood_phase_flags_and_nll_default(tmp_path):
    run_dir = tmp_path / "run"
    config = _tiny_toml(tmp_path / "c.toml", steps=6, save_every=3, log_every=3)
    args = ["train", "--config", str(config), "--run-dir", str(run_dir), "--json"]
    args += ["--likelihood-steps", "3", "--likelihood-lr", "5e-4", "--input-octaves", "2"]
    args += ["--forward-anchor", "linear", "--likelihood-bound-weight", "0"]
    args += ["--predictor-residual", "on"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 9
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["likelihood_steps"] == 3 and stored["likelihood_lr"] == 5e-4
    assert stored["likelihood_bound_weight"] == 0.0
    assert stored["model"]["input_octaves"] == 2 and stored["model"]["forward_anchor"] == "linear"
    assert stored["model"]["predictor_residual"] is True
    phases = [json.loads(line)["phase"] for line in (run_dir / "metrics.jsonl").open()]
    assert phases == ["simulation-free", "simulation-free", "likelihood"]
    # After a likelihood phase, `nll` reports the ODE NLL (what the model last optimised).
    nll = runner.invoke(
        app,
        ["nll", "--run-dir", str(run_dir), "--data", "eight-gaussians", "--num", "16", "--json"],
    )
    assert nll.exit_code == 0, nll.stderr
    assert json.loads(nll.stdout.strip().splitlines()[-1])["method"] == "ode"


def test_help_defaults_are_the_librarys():
    """`train --help` shows every setting's default, and each is `TrainConfig`'s."""
    import enum
    import typing

    from nfdm_de.cli import _train_options as options

    config = nd.TrainConfig()
    checked = 0
    for name, section in nd.FLAT_SETTINGS.items():
        alias = "".join(part.capitalize() for part in name.split("_")) + "Option"
        value = getattr(config if section is None else getattr(config, section), name)
        if not hasattr(options, alias) or value is None:
            continue  # a setting without a flag (TOML only), or one chosen from the data
        shown = typing.get_args(getattr(options, alias))[1].show_default
        expected = value.value if isinstance(value, enum.Enum) else value
        assert str(shown) == str(expected) or float(shown) == expected, (name, shown, value)
        checked += 1
    assert checked >= 20


def test_train_help_lists_every_enum_setting_choice():
    from nfdm_de.cli._train_options import CHOICES

    enums = {
        "forward": nd.ForwardChoice,
        "volatility": nd.VolatilityChoice,
        "likelihood_trace": nd.TraceChoice,
        "forward_anchor": nd.AnchorChoice,
        "predictor_skip": nd.PredictorSkipChoice,
        "schedule": nd.ScheduleChoice,
    }
    for name, enum in enums.items():
        assert set(CHOICES[name]) == {choice.value for choice in enum}, name
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "400"}).stdout
    rows = {}
    for line in help_text.splitlines():
        words = line.strip("│ ").split()
        if words and words[0].startswith("--"):
            rows[words[0][2:].replace("-", "_")] = line
    for name, choices in CHOICES.items():
        assert "CHOICE" in rows[name], rows[name]
        assert all(choice in rows[name] for choice in choices), (name, rows[name])


def test_malformed_command_lines_are_one_line_and_exit_2(capsys):
    from nfdm_de.cli.main import run

    cases = [
        (["nll", "--run-dir", "x", "--data", "y", "--method", "xyz"], "'xyz' is not one of"),
        (["train", "--bogus"], "No such option: --bogus"),
        (["train", "--steps", "abc"], "'--steps'"),
        (["sample"], "Missing option '--run-dir'"),
    ]
    for args, match in cases:
        assert run(args) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
        assert f"(see 'nfdm-de {args[0]} --help')" in lines[0] and captured.out == ""
    assert run(["nll", "--run-dir", "x", "--data", "y", "--json", "--method", "xyz"]) == 2
    assert "'xyz' is not one of" in json.loads(capsys.readouterr().out)["error"]
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == nd.__version__
