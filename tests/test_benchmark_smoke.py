"""The benchmark scripts behind docs/results.md run end to end on tiny settings and print their
tables (the figures themselves are measured by running them in full)."""

import pytest
from helpers import run_benchmark


def test_batch_stream_benchmark():
    result = run_benchmark("batch_stream.py", ["--batches", "5"])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 3 and all(float(row.split("|")[2]) > 0 for row in rows)


@pytest.mark.slow
def test_likelihood_speed_benchmark():
    args = ["--dims", "2", "--num", "40", "--train-steps", "3", "--phase-after", "20"]
    result = run_benchmark("likelihood_speed.py", args)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for model in ("nfdm-de FM (example-max)", "nfdm-de FM (batch-rms)", "nfdm-de NFDM"):
        assert f"| 2 | {model}" in out
    assert "NFDM / own FM" in out and "likelihood-phase step" in out
