"""Hostile and unlucky input to `train`, `sample` and `nll`: every failure is one `error:` line
with exit code 1, outputs land atomically at exactly the path named, a failed save changes
nothing, tampered run directories and checkpoint headers are refused by name, and the tool
deletes only files it wrote."""

import dataclasses
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from typer.testing import CliRunner

import nfdm_de as nd
import nfdm_de._files as files
from nfdm_de.cli.main import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TINY = ["--data", "eight-gaussians", "--batch-size", "32", "--width", "16", "--depth", "1"]
TINY += ["--likelihood-steps", "0", "--warmup", "5", "--save-every", "10", "--log-every", "10"]


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


def _fails_cleanly(args, *matches, after_progress=False):
    """Exit code 1 and one `error:` line naming `matches`; with `after_progress` the failure
    came mid-run, after the progress lines, so only the last line is the error."""
    result = _invoke(args)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert (after_progress or len(lines) == 1) and lines[-1].startswith("error: "), result.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    for match in matches:
        assert match in lines[-1], lines[-1]
    assert "Traceback" not in result.stderr
    # With --json the error is one JSON object on stdout too; without, stdout stays empty.
    if "--json" in [str(a) for a in args]:
        assert json.loads(result.stdout) == {"error": lines[-1].removeprefix("error: ")}
    else:
        assert result.stdout == ""
    return lines[-1]


def _snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 20-step run with checkpoints at steps 10 and 20."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    result = _invoke(["train", "--run-dir", run_dir, "--steps", "20", *TINY])
    assert result.exit_code == 0, result.stderr
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _checkpoints(run_dir: Path) -> list[Path]:
    return [Path(p) for _, p in nd.list_checkpoints(str(run_dir / "checkpoints"))]


def _rewrite_header(path: Path, **changes):
    head, payload = path.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    for key, value in changes.items():
        if value is ...:
            header.pop(key)
        else:
            header[key] = value
    path.write_bytes(json.dumps(header).encode() + b"\n" + payload)


# --- outputs --------------------------------------------------------------------------------


def test_out_without_npy_extension_replaces_the_file_atomically(run_copy, tmp_path):
    target = tmp_path / "samples"
    target.write_bytes(b"the user's old file")
    result = _invoke(
        ["sample", "--run-dir", run_copy, "--num", "8", "--steps", "4", "--out", target]
    )
    assert result.exit_code == 0, result.stderr
    samples = np.load(target)  # exactly the named path holds the samples, not a hidden temp
    assert samples.shape == (8, 2) and np.all(np.isfinite(samples))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "samples"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_plot_and_per_example_files_have_the_format_their_names_say(run_copy, tmp_path):
    pdf, csv = tmp_path / "plot.pdf", tmp_path / "nll.txt"
    args = ["sample", "--run-dir", run_copy, "--num", "8", "--steps", "4", "--plot", pdf]
    assert _invoke(args).exit_code == 0
    assert pdf.read_bytes().startswith(b"%PDF")
    args = ["nll", "--run-dir", run_copy, "--data", "eight-gaussians", "--num", "6"]
    result = _invoke([*args, "--method", "bound", "--per-example", csv])
    assert result.exit_code == 0, result.stderr
    table = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert table.shape == (6,) and np.all(np.isfinite(table))
    _fails_cleanly(["sample", "--run-dir", run_copy, "--plot", tmp_path / "p.xyz"], "'xyz'")
    assert not (tmp_path / "p.xyz").exists()
    # A directory or a path under a file is refused before any work starts.
    _fails_cleanly(["sample", "--run-dir", run_copy, "--out", run_copy], "it is a directory")
    _fails_cleanly([*args, "--per-example", pdf / "x.csv"], "is a file, not a directory")
    num = ["sample", "--run-dir", run_copy, "--num", str(2**31)]
    _fails_cleanly(num, "exceeds the 2**31 values")


def test_reference_files_and_names(run_copy, tmp_path):
    sample = ["sample", "--run-dir", run_copy, "--num", "8", "--steps", "4", "--json"]
    np.savez(tmp_path / "ref.npz", x=np.random.default_rng(0).normal(size=(20, 2)))
    for reference in (tmp_path / "ref.npz", "eight-gaussians"):
        result = _invoke([*sample, "--reference", reference])
        assert result.exit_code == 0, result.stderr
        assert np.isfinite(json.loads(result.stdout.splitlines()[-1])["mmd"])
    np.save(tmp_path / "scalar.npy", np.float64(3.0))
    _fails_cleanly([*sample, "--reference", tmp_path / "scalar.npy"], "rank 2")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy at all, not a pickle either")
    line = _fails_cleanly([*sample, "--reference", tmp_path / "garbage.npy"], "not a NumPy file")
    assert "pickle" not in line


# --- checkpoints and run directories --------------------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "tampered"])
def test_unreadable_newest_checkpoint(run_copy, damage):
    older, newest = _checkpoints(run_copy)
    if damage == "empty":
        newest.write_bytes(b"")
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:-100])
    else:
        _rewrite_header(newest, dtype="__import__('os')")
    result = _invoke(["sample", "--run-dir", run_copy, "--num", "4", "--steps", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["checkpoint_step"] == 10
    assert (
        "warning: skipped unreadable checkpoint" in result.stderr and newest.name in result.stderr
    )
    before = _snapshot(run_copy)
    line = _fails_cleanly(["train", "--run-dir", run_copy, "--resume"], "cannot resume")
    assert newest.name in line and older.name in line
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"dtype": "__import__('os')"}, "'dtype'"),
        ({"data_shape": ...}, "'data_shape'"),
        ({"data_shape": [2, -1]}, "'data_shape'"),
        ({"data_iterator": ...}, "'data_iterator'"),
        ({"data_iterator": {"next_index": "0"}}, "'data_iterator'"),
        ({"step": "../../etc"}, "'step'"),
        ({"step": 7}, "file name step 20"),
        ({"num_levels": 1}, "'num_levels'"),
        ({"config": [1, 2]}, "'config'"),
        ({"loss": "low"}, "'loss'"),
    ],
)
def test_tampered_header_is_named(run_copy, changes, match):
    for path in _checkpoints(run_copy):
        _rewrite_header(path, **changes)
    before = _snapshot(run_copy)
    line = _fails_cleanly(["sample", "--run-dir", run_copy], "step_00000020.eqx", match)
    assert "can be read" in line
    _fails_cleanly(["train", "--run-dir", run_copy, "--resume"], "step_00000020.eqx", match)
    assert _snapshot(run_copy) == before


@pytest.mark.parametrize("content", ["5", "null", "[1, 2]", '{"steps": "many"}'])
def test_malformed_config_json(run_copy, content):
    (run_copy / "config.json").write_text(content)
    before = _snapshot(run_copy)
    _fails_cleanly(["train", "--run-dir", run_copy, "--resume"], "config.json")
    assert _snapshot(run_copy) == before


def test_checkpoints_that_is_a_file_or_a_link_out_is_refused(run_copy, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run_copy / "checkpoints", elsewhere)
    (elsewhere / "step_00000001.eqx").write_bytes(b"not this run's")
    kept = _snapshot(elsewhere)
    (run_copy / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    resume = ["train", "--run-dir", run_copy, "--resume", "--steps", "40"]
    _fails_cleanly(resume, "a link out of the run directory")
    assert _snapshot(elsewhere) == kept
    (run_copy / "checkpoints").unlink()
    (run_copy / "checkpoints").write_text("a file")
    before = _snapshot(run_copy)
    _fails_cleanly(resume, "not a directory")
    assert _snapshot(run_copy) == before


def test_run_dir_under_a_file_and_toml_run_dir_of_the_wrong_type(tmp_path):
    (tmp_path / "file").write_text("x")
    _fails_cleanly(["train", "--run-dir", tmp_path / "file" / "run", *TINY], "is a file")
    (tmp_path / "c.toml").write_text("run_dir = 5\n")
    _fails_cleanly(["train", "--config", tmp_path / "c.toml", *TINY], "run_dir must be a path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml", "file"]


def test_resume_with_fewer_steps_changes_nothing(run_copy):
    before = _snapshot(run_copy)
    _fails_cleanly(
        ["train", "--run-dir", run_copy, "--resume", "--steps", "15"], "already at step 20"
    )
    assert _snapshot(run_copy) == before


def test_stale_temporaries_are_removed_and_only_those(run_copy):
    stale = [
        run_copy / "checkpoints" / ".step_00000030.eqx.k1ll3d.tmp",
        run_copy / ".config.json.abc123.tmp",
        run_copy / ".metrics.jsonl.x.tmp",
    ]
    mine = [run_copy / "notes.tmp", run_copy / "checkpoints" / ".step_00000030.eqx.keep"]
    for path in stale + mine:
        path.write_bytes(b"partial")
    result = _invoke(["train", "--run-dir", run_copy, "--resume", "--steps", "20"])
    assert result.exit_code == 0, result.stderr
    assert not any(p.exists() for p in stale) and all(p.exists() for p in mine)


def test_failed_save_leaves_the_run_as_it_was(run_copy, monkeypatch):
    """Disk full while writing the next checkpoint: the earlier checkpoint, config.json and
    metrics.jsonl keep their bytes, and no temporary file is left behind."""
    before = _snapshot(run_copy)
    real = files.atomic_write

    def disk_full(path, write):
        if os.path.basename(path).startswith("step_"):

            def partial(f):
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, "No space left on device", path)

            return real(path, partial)
        return real(path, write)

    monkeypatch.setattr(files, "atomic_write", disk_full)
    line = _fails_cleanly(
        ["train", "--run-dir", run_copy, "--resume", "--steps", "30", "--log-every", "5"],
        "No space left on device",
        after_progress=True,
    )
    assert "step_00000030.eqx" in line
    assert _snapshot(run_copy) == before


def test_out_of_memory_names_the_option_to_lower(tmp_path):
    line = _fails_cleanly(
        ["train", "--run-dir", tmp_path / "run", *TINY, "--width", "1000000", "--depth", "2"],
        "out of memory",
    )
    assert "--batch-size" in line and "--width" in line


@pytest.mark.parametrize("command", ["train", "sample", "nll"])
def test_seed_too_large(command, tmp_path):
    args = {
        "train": ["train", "--run-dir", tmp_path / "run", *TINY],
        "sample": ["sample", "--run-dir", tmp_path],
        "nll": ["nll", "--run-dir", tmp_path, "--data", "rings"],
    }[command]
    _fails_cleanly([*args, "--seed", str(2**64)], "seed", "2**63")


# --- schedules, resumption and reports ------------------------------------------------------


def _params(run_dir: Path):
    return jax.tree.leaves(nd.load_run(str(run_dir)).raw_model)


def test_constant_schedule_extends_exactly_and_final_loss_is_the_last_steps(tmp_path):
    config = nd.TrainConfig(
        data="eight-gaussians",
        model=nd.ModelConfig(width=16, depth=1),
        optim=nd.OptimConfig(lr=3e-3, warmup=15, schedule=nd.ScheduleChoice.CONSTANT),
        steps=20,
        batch_size=32,
        num_train=256,
        save_every=10,
        log_every=1,
        likelihood_steps=0,
    )
    straight = nd.train(config, tmp_path / "straight")
    # 10 steps (warm-up longer than the run), then extended to 20 with another log interval.
    short = nd.train(dataclasses.replace(config, steps=10), tmp_path / "resumed")
    assert short.steps == 10
    longer = dataclasses.replace(config, log_every=7)
    resumed = nd.train(longer, tmp_path / "resumed", resume=True)
    assert resumed.resumed_from == 10 and resumed.steps == 20
    for a, b in zip(_params(tmp_path / "straight"), _params(tmp_path / "resumed"), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = [
        json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["step"] == 20
    assert straight.final_loss == rows[-1]["loss"] == resumed.final_loss
    assert straight.final_terms == resumed.final_terms


def test_version_and_json_errors(tmp_path):
    import nfdm_de

    result = _invoke(["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == nfdm_de.__version__
    # With --json a failure is one JSON object on stdout too (and the line on stderr).
    result = _invoke(["sample", "--run-dir", tmp_path, "--json"])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    error = json.loads(result.stdout.strip().splitlines()[-1])["error"]
    assert "holds no nfdm-de checkpoint" in error


@pytest.mark.slow
def test_cli_keeps_compiled_programs_between_runs(tmp_path):
    """A real `nfdm-de train` fills the CLI's compilation cache (NFDM_DE_COMPILE_CACHE), and
    `--no-compile-cache` leaves it alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(NFDM_DE_COMPILE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    args = ["train", *TINY, "--steps", "3", "--width", "8", "--forward", "linear"]

    def run(*extra, run_dir):
        command = [
            sys.executable,
            "-m",
            "nfdm_de.cli.main",
            *extra,
            *args,
            "--run-dir",
            str(run_dir),
        ]
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]

    run("--no-compile-cache", run_dir=tmp_path / "a")
    assert not (tmp_path / "cache").exists()
    run(run_dir=tmp_path / "b")
    assert any((tmp_path / "cache").iterdir())


def test_chunks_help_says_what_is_reproduced():
    for command in ("sample", "nll"):
        text = " ".join(_invoke([command, "--help"]).stdout.split())
        assert "float rounding" in text and "same samples on any device count" not in text
