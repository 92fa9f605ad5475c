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
