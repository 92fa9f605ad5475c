"""benchmarks/density.py: the seed averaging is the stated estimator, and bad options fail fast."""

import math
import os
import sys

import numpy as np
import pytest
from helpers import ROOT, run_benchmark

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from density import paired_over_seeds  # noqa: E402


def test_paired_difference_is_averaged_over_seeds_with_the_stated_error():
    rng = np.random.default_rng(0)
    per_point, expected = {}, []
    for seed, (shift, spread) in zip((0, 3), ((-0.01, 0.02), (0.03, 0.05)), strict=True):
        mine = rng.normal(size=400)
        difference = shift + spread * rng.normal(size=400)
        per_point[(seed, "rings", "nfdm", "bound")] = mine
        per_point[(seed, "rings", "linear", "bound")] = mine - difference
        expected.append((difference.mean(), difference.std(ddof=1) / math.sqrt(difference.size)))
    mean, stderr = paired_over_seeds((0, 3), "rings", "nfdm", "linear", "bound", per_point)
    # The points' own spread (std 1) cancels in the pairing; the seeds are averaged.
    assert mean == pytest.approx((expected[0][0] + expected[1][0]) / 2, abs=1e-12)
    assert stderr == pytest.approx(math.hypot(expected[0][1], expected[1][1]) / 2, abs=1e-12)
    assert stderr < 0.01
    # A seed missing for either method gives no comparison rather than a partial one.
    assert paired_over_seeds((0, 3, 5), "rings", "nfdm", "linear", "bound", per_point) is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "1,1"], "--seeds must list distinct integers"),
        (["--likelihood-steps", "-1"], "--likelihood-steps must be >= 0"),
        (["--methods", "nfdm,maf"], "unknown method 'maf'"),
    ],
)
def test_bad_options_fail_before_training(args, message):
    result = run_benchmark("density.py", args)
    assert result.returncode == 2
    assert message in result.stderr
