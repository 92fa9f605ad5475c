"""Importance sampling of t in the objective and the bound (`importance_times`, `time_power`)."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import DATA_SIZE, IDENTITY_TOL, forward_processes, perturb

import nfdm_de as nd

K_SIGMA = 4.0  # agreement of independent Monte Carlo estimates: within 4 standard errors


def test_weights_are_the_inverse_proposal_density(getkey):
    # f(t) = t^(-1/2) has integral 2 and infinite variance under uniform t; with t = u^2 the
    # weighted integrand 2u * f(u^2) = 2 is constant: an exact, zero-variance estimator.
    t, w = nd.importance_times(64, 2.0, key=getkey())
    assert float(jnp.max(jnp.abs(w * t**-0.5 - 2.0))) < IDENTITY_TOL
    # the weights are dt/du: their mean estimates the length of [0, 1]
    t, w = nd.importance_times(4096, 3.0, key=getkey())
    assert abs(float(jnp.mean(w)) - 1.0) < 1e-3
    assert float(jnp.min(t)) >= 0 and float(jnp.max(t)) <= 1
    # power 1 is plain stratified sampling with unit weights
    key = getkey()
    t1, w1 = nd.importance_times(16, 1.0, key=key)
    assert float(jnp.max(jnp.abs(t1 - nd.stratified_times(16, key=key)))) == 0
    assert float(jnp.max(jnp.abs(w1 - 1))) == 0


@pytest.mark.parametrize("power", [0.5, math.nan, math.inf])
def test_bad_power_is_refused(power, getkey):
    with pytest.raises(ValueError, match="power"):
        nd.importance_times(8, power, key=getkey())
    with pytest.raises(ValueError, match="time_power"):
        nd.ModelConfig(time_power=power)


def _model(key):
    k1, k2, k3, k4 = jr.split(key, 4)
    forward = forward_processes(k1)["neural-gaussian"]
    predictor = perturb(nd.mlp_predictor(DATA_SIZE, width=16, depth=2, key=k2), k3)
    return nd.NFDM(forward, predictor, nd.LearnedVolatility(key=k4))


def test_bound_is_unbiased_and_less_noisy_under_importance_sampling(getkey):
    # The same bound by uniform and by importance-sampled t: per example, the two Monte Carlo
    # means agree within K_SIGMA combined standard errors (independent keys), and the spread of
    # the importance-weighted terms is smaller (the integrand peaks at small t).
    model = _model(getkey())
    x = jr.normal(getkey(), (4, DATA_SIZE))
    uniform, _ = nd.variational_bound(model, x, key=getkey(), num_samples=4096)
    weighted, _ = nd.variational_bound(model, x, key=getkey(), num_samples=4096, time_power=2.0)
    difference = np.abs(np.asarray(uniform.value - weighted.value))
    combined = np.hypot(np.asarray(uniform.example_stderr), np.asarray(weighted.example_stderr))
    assert np.all(difference < K_SIGMA * combined), (difference, combined)
    assert np.all(np.asarray(weighted.example_stderr) < np.asarray(uniform.example_stderr))


def test_loss_uses_the_weights(getkey):
    # loss(time_power=p) is exactly the batch mean of example_loss at t = u^p with weights 1/p(t).
    model = _model(getkey())
    x = jr.normal(getkey(), (8, DATA_SIZE))
    key = getkey()
    value, breakdown = nd.loss(model, x, key=key, time_power=2.5)
    t_key, eps_key = jr.split(key)
    t, w = nd.importance_times(8, 2.5, x.dtype, key=t_key)
    eps = jr.normal(eps_key, x.shape, x.dtype)
    per = jax.vmap(lambda a, b, c, d: nd.example_loss(model, a, b, c, time_weight=d))(x, t, eps, w)
    assert abs(float(value) - float(jnp.mean(per.total))) < IDENTITY_TOL * max(1, abs(float(value)))
    unweighted = jax.vmap(lambda a, b, c: nd.example_loss(model, a, b, c))(x, t, eps)
    expected = jnp.mean(w * unweighted.diffusion)
    assert abs(float(breakdown.diffusion) - float(expected)) < IDENTITY_TOL * float(expected)
