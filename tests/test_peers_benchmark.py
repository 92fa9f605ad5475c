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


def test_paired_table_averages_seeds_and_pairs_points(tmp_path):
    # Hand-made per-point gaps for two seeds: the table's cells are the closed-form means and
    # the NFDM-minus-peer differences over the same points.
    import numpy as np

    rng = np.random.default_rng(0)
    gaps = {}
    for seed in (0, 1):
        for method, q in (("nfdm", "ode"), ("maf", "exact")):
            gaps[seed, method] = rng.normal(size=50) + (2.0 if method == "nfdm" else 1.0)
            np.save(tmp_path / f"shapes-8d_{method}_s{seed}_{q}.npy", gaps[seed, method])
    result = run_benchmark("peers.py", ["--paired", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if "| shapes-8d | maf | exact |" in line)
    mean_maf = (gaps[0, "maf"] + gaps[1, "maf"]).mean() / 2
    difference = sum(gaps[s, "nfdm"] - gaps[s, "maf"] for s in (0, 1)) / 2
    assert row.startswith(f"| shapes-8d | maf | exact | {mean_maf:.3f} ± ")
    assert f"| {difference.mean():.3f} ± " in row and "Seeds [0, 1]" in result.stdout
