"""Each example runs end to end in its smoke mode, as a user would run it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", script), "--smoke", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """One run root for the two examples that share their runs (`straight_trajectories.py` loads
    the NFDM-OT and linear runs `solver_ablation.py` trains, or trains them when they are not
    there yet), as they do by default."""
    return tmp_path_factory.mktemp("solver_ablation") / "runs"


@pytest.mark.slow
def test_solver_ablation_smoke(tmp_path, run_root):
    plot = tmp_path / "ablation.png"
    out = _run("solver_ablation.py", "--run-root", str(run_root), "--plot", str(plot), cwd=ROOT)
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| nfdm") or line.startswith("| linear")
    ]
    assert {row.split("|")[1].strip() for row in rows} == {"nfdm", "nfdm-ot", "linear"}
    assert any("| sde |" in row for row in rows) and any("tol 0.01" in row for row in rows)
    for row in rows:  # finite NFE, energy distance and MMD
        nfe, energy, mmd = (float(row.split("|")[i]) for i in (5, 6, 7))
        assert nfe >= 2 and abs(energy) < 10 and abs(mmd) < 10
    assert plot.stat().st_size > 1000
    # A second call loads the finished runs instead of training again.
    again = _run("solver_ablation.py", "--run-root", str(run_root), "--plot", str(plot), cwd=ROOT)
    assert "loading nfdm-ot" in again and "training" not in again


@pytest.mark.slow
def test_straight_trajectories_smoke(tmp_path, run_root):
    plot = tmp_path / "paths.png"
    out = _run(
        "straight_trajectories.py", "--run-root", str(run_root), "--plot", str(plot), cwd=ROOT
    )
    assert "nfdm-ot: excess path length" in out and "linear: excess path length" in out
    assert plot.stat().st_size > 1000


@pytest.mark.slow
def test_custom_forward_process_smoke(tmp_path):
    out = _run("custom_forward_process.py", cwd=tmp_path)
    assert "energy distance to held-out data" in out and "learned log-scale correction" in out


@pytest.mark.slow
def test_conditional_digits_smoke(tmp_path):
    plot = tmp_path / "grid.png"
    out = _run(
        "conditional_digits.py", "--run-dir", str(tmp_path / "runs"), "--plot", str(plot), cwd=ROOT
    )
    accuracy = next(line for line in out.splitlines() if line.startswith("accuracy:"))
    assert len(accuracy.split()) == 1 + 10 + 2  # ten classes and the mean
    assert plot.stat().st_size > 1000
