"""benchmarks/peers.py: a missing peer package is skipped with a message, not a crash."""

from helpers import run_benchmark


def test_maf_is_skipped_or_run_cleanly():
    try:
        import flowjax  # noqa: F401

        have = True
    except ImportError:
        have = False
    args = ["--steps", "3", "--sets", "eight-gaussians", "--methods", "maf", "--num-test", "20"]
    result = run_benchmark("peers.py", args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| set | method | NLL | gap |" in result.stdout
    if have:
        assert "| eight-gaussians | maf | exact |" in result.stdout
    else:
        assert "skipping maf: flowjax is not installed" in result.stderr
        assert "| eight-gaussians | maf" not in result.stdout


def test_saved_points_are_the_printed_gaps(tmp_path):
    # A 3-step flow-matching run scored on a tiny held-out set: the saved per-point gaps average
    # to the printed gap and load back under density.load_points' keys.
    import os
    import sys

    from helpers import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from density import load_points

    args = ["--steps", "3", "--sets", "two-moons", "--methods", "flow-matching", "--num-test", "30"]
    result = run_benchmark("peers.py", args + ["--save-points", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    points = load_points(str(tmp_path))
    gaps = points[(0, "two-moons", "flow-matching", "ode")]
    assert gaps.shape == (30,)
    row = next(
        line for line in result.stdout.splitlines() if "| two-moons | flow-matching |" in line
    )
    assert f"{gaps.mean():.3f}" in row
