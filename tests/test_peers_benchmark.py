"""benchmarks/peers.py: a missing peer package is skipped with a message, not a crash."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_maf_is_skipped_or_run_cleanly():
    try:
        import flowjax  # noqa: F401

        have = True
    except ImportError:
        have = False
    args = ["--steps", "3", "--sets", "eight-gaussians", "--methods", "maf", "--num-test", "20"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "peers.py"), *args],
        capture_output=True,
        text=True,
        cwd=os.path.join(ROOT, "benchmarks"),
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| set | method | NLL | gap |" in result.stdout
    if have:
        assert "| eight-gaussians | maf | exact |" in result.stdout
    else:
        assert "skipping maf: flowjax is not installed" in result.stderr
        assert "| eight-gaussians | maf" not in result.stdout
