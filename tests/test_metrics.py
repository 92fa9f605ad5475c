"""Energy distance and MMD against a plain numpy double loop, and their behaviour on samples of
one distribution versus shifted ones."""

import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import IDENTITY_TOL

import nfdm_de as nd


def _loop_energy(x, y):
    def mean_dist(a, b, same):
        total, count = 0.0, 0
        for i in range(len(a)):
            for j in range(len(b)):
                if same and i == j:
                    continue
                total += math.sqrt(sum((a[i][k] - b[j][k]) ** 2 for k in range(len(a[i]))))
                count += 1
        return total / count

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)


def _loop_mmd(x, y, bandwidths):
    def k(a, b):
        sq = sum((a[i] - b[i]) ** 2 for i in range(len(a)))
        return sum(math.exp(-sq / (2 * h**2)) for h in bandwidths)

    def mean_k(a, b, same):
        values = [k(a[i], b[j]) for i in range(len(a)) for j in range(len(b)) if not same or i != j]
        return sum(values) / len(values)

    return mean_k(x, x, True) + mean_k(y, y, True) - 2 * mean_k(x, y, False)


def test_metrics_match_double_loop(getkey):
    x = jr.normal(getkey(), (7, 3))
    y = jr.normal(getkey(), (5, 3)) + 0.5
    xs, ys = np.asarray(x).tolist(), np.asarray(y).tolist()
    bandwidths = (0.5, 1.0, 3.0)
    # Row blocks of 3 exercise the padding of a 7-row sample.
    for block in (3, 256):
        energy = float(nd.energy_distance(x, y, block_size=block))
        assert abs(energy - _loop_energy(xs, ys)) <= IDENTITY_TOL
        mmd = float(nd.mmd(x, y, bandwidths=bandwidths, block_size=block))
        assert abs(mmd - _loop_mmd(xs, ys, bandwidths)) <= IDENTITY_TOL


def test_metrics_flatten_images(getkey):
    x = jr.normal(getkey(), (6, 2, 2))
    y = jr.normal(getkey(), (4, 2, 2))
    flat = float(nd.energy_distance(x.reshape(6, 4), y.reshape(4, 4)))
    assert abs(float(nd.energy_distance(x, y)) - flat) <= IDENTITY_TOL


def test_metrics_separate_shifted_samples(getkey):
    x = jr.normal(getkey(), (600, 2))
    same = jr.normal(getkey(), (600, 2))
    shifted = jr.normal(getkey(), (600, 2)) + jnp.array([1.0, 0.0])
    energy_same = float(nd.energy_distance(x, same))
    energy_shifted = float(nd.energy_distance(x, shifted))
    mmd_same = float(nd.mmd(x, same))
    mmd_shifted = float(nd.mmd(x, shifted))
    # Unbiased estimates: near zero (either sign) for one distribution, far above it otherwise.
    assert abs(energy_same) < 0.02 and energy_shifted > 0.3
    assert abs(mmd_same) < 0.02 and mmd_shifted > 0.2
    assert energy_shifted > 15 * abs(energy_same) and mmd_shifted > 15 * abs(mmd_same)


def test_metrics_bad_input(getkey):
    with pytest.raises(ValueError, match="same example size"):
        nd.energy_distance(jnp.zeros((4, 2)), jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        nd.mmd(jnp.zeros((1, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="positive"):
        nd.mmd(jnp.zeros((4, 2)), jnp.ones((4, 2)), bandwidths=(1.0, -1.0))
