"""benchmarks/density.py: the seed averaging is the stated estimator, and bad options fail fast."""

import math
import os
import sys

import numpy as np
import pytest
from helpers import ROOT, run_benchmark

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _density_common import NFDM_METHODS, Budget, _config  # noqa: E402
from density import (  # noqa: E402
    _points_file,
    load_points,
    never_beaten,
    paired_over_seeds,
    print_paired,
)


def _synthetic_scores(rng, num_seeds, num_points, point_sd, seed_sd, noise_sd, true_shift):
    """Per-point NLL gaps of two methods on one held-out sample shared by all seeds: each point
    has its own difference (common to every seed), each training seed shifts the difference
    as a whole, and each (seed, point) adds independent noise (the bound's Monte Carlo)."""
    point_effect = point_sd * rng.normal(size=num_points)
    per_point = {}
    for seed in range(num_seeds):
        mine = rng.normal(size=num_points)  # the points' own spread, which pairing cancels
        difference = (
            true_shift
            + point_effect
            + seed_sd * rng.normal()
            + noise_sd * rng.normal(size=num_points)
        )
        per_point[(seed, "rings", "nfdm", "bound")] = mine
        per_point[(seed, "rings", "linear", "bound")] = mine - difference
    return per_point


def test_paired_difference_is_the_mean_over_seeds_and_points():
    rng = np.random.default_rng(0)
    per_point = _synthetic_scores(rng, 3, 400, 0.05, 0.01, 0.02, true_shift=-0.01)
    mean, _ = paired_over_seeds((0, 1, 2), "rings", "nfdm", "linear", "bound", per_point)
    expected = np.mean(
        [
            per_point[(s, "rings", "nfdm", "bound")] - per_point[(s, "rings", "linear", "bound")]
            for s in range(3)
        ]
    )
    assert mean == pytest.approx(expected, abs=1e-12)
    # A seed missing for either method gives no comparison rather than a partial one.
    assert paired_over_seeds((0, 1, 5), "rings", "nfdm", "linear", "bound", per_point) is None


@pytest.mark.parametrize(
    "point_sd, seed_sd", [(0.05, 0.0), (0.0, 0.01), (0.03, 0.005)], ids=["points", "seeds", "both"]
)
def test_paired_standard_error_matches_the_estimators_spread(point_sd, seed_sd):
    # Oracle: the spread of the estimate itself over many independent replications (fresh
    # held-out points and fresh seeds each time). The stated s.e. must match it on average; the
    # older rule (per-seed s.e. combined as if independent) understated it by sqrt(seeds) when
    # the points dominate, and ignored the seeds' own spread.
    rng = np.random.default_rng(1)
    seeds, num_points, replications = (0, 1, 2, 3), 200, 400
    estimates, stated = [], []
    for _ in range(replications):
        per_point = _synthetic_scores(rng, 4, num_points, point_sd, seed_sd, 0.02, 0.0)
        mean, stderr = paired_over_seeds(seeds, "rings", "nfdm", "linear", "bound", per_point)
        estimates.append(mean)
        stated.append(stderr)
    actual = np.std(estimates, ddof=1)
    typical = math.sqrt(np.mean(np.square(stated)))
    # Errs on the wide side only by the Monte Carlo term counted twice (at most ~sqrt(2)).
    assert 0.85 * actual < typical < 1.5 * actual


def test_sets_missing_a_baseline_are_not_counted_as_won(capsys):
    # rings: nfdm below both baselines; spirals: the vp run is missing, so it cannot count.
    ones = np.ones(50)
    per_point = {
        (0, "rings", "nfdm", "bound"): 0.1 * ones,
        (0, "rings", "vp", "bound"): 0.2 * ones + 0.01 * np.sin(np.arange(50)),
        (0, "rings", "linear", "bound"): 0.3 * ones + 0.01 * np.cos(np.arange(50)),
        (0, "spirals", "nfdm", "bound"): 0.1 * ones,
        (0, "spirals", "linear", "bound"): 0.3 * ones + 0.01 * np.cos(np.arange(50)),
    }
    print_paired([0], ["rings", "spirals"], "nfdm", ["vp", "linear"], per_point)
    out = capsys.readouterr().out
    assert "lowest of all methods on 1 of 1 sets" in out
    assert "beyond 2 s.e. on 1 of 1" in out


def test_never_beaten_counts_ties_for_lowest():
    # rings: a and b tie (differences with mean 0) and both are clearly below c;
    # spirals: c is clearly lowest; two-moons: c's run is missing, so the set is left out.
    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    per_point = {}
    for seed in (0, 1):
        noise = lambda: 0.01 * rng.normal(size=200)  # noqa: E731
        per_point[(seed, "rings", "a", "bound")] = base + noise()
        per_point[(seed, "rings", "b", "bound")] = base + noise()
        per_point[(seed, "rings", "c", "bound")] = base + 0.1 + noise()
        per_point[(seed, "spirals", "a", "bound")] = base + 0.1 + noise()
        per_point[(seed, "spirals", "b", "bound")] = base + 0.1 + noise()
        per_point[(seed, "spirals", "c", "bound")] = base + noise()
        per_point[(seed, "two-moons", "a", "bound")] = base + noise()
        per_point[(seed, "two-moons", "b", "bound")] = base + noise()
    sets = ["rings", "spirals", "two-moons"]
    counts = never_beaten([0, 1], sets, ["a", "b", "c"], "bound", per_point)
    assert counts == {"a": ["rings"], "b": ["rings"], "c": ["spirals"]}


def test_saved_points_load_back_under_their_keys(tmp_path):
    # Runs split over processes are compared afterwards from the files `--save-points` wrote.
    rng = np.random.default_rng(2)
    saved = {
        (seed, name, label, q): rng.normal(size=5)
        for seed in (0, 11)
        for name in ("two-moons", "gmm-10d")
        for label in ("nfdm", "learned-schedule", "nfdm+ml")
        for q in ("bound", "ode")
    }
    for (seed, name, label, q), array in saved.items():
        np.save(_points_file(str(tmp_path), seed, name, label, q), array)
    (tmp_path / "notes.txt").write_text("not a gap array")
    loaded = load_points(str(tmp_path))
    assert loaded.keys() == saved.keys()
    for key, array in saved.items():
        np.testing.assert_array_equal(loaded[key], array)


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


def test_learned_anchor_is_nfdm_with_its_network_frozen():
    import nfdm_de as nd

    settings, which = NFDM_METHODS["learned-anchor"]
    config = _config("two-moons", settings, Budget(10, 8, 8, 1), None)
    reference = _config("two-moons", NFDM_METHODS["nfdm"][0], Budget(10, 8, 8, 1), None)
    assert config.optim.forward_network_lr_scale == 0.0 and which == ("bound", "ode")
    # Everything else is NFDM's configuration: the same mixed-anchor neural-gaussian model.
    assert config.model == reference.model and config.model.forward_anchor is nd.AnchorChoice.MIXED
    assert config.model.forward is nd.ForwardChoice.NEURAL_GAUSSIAN
