"""Likelihood oracles (float64): the ODE log-likelihood of the Gaussian oracle model against its
closed form, Hutchinson against the exact trace, the variational bound, and bits/dim."""

import math

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from gaussian_oracle import (
    FORWARDS,
    gaussian_data,
    gaussian_log_prob,
    oracle_model,
)
from scipy.stats import norm

import nfdm_de as nd

ORACLE_TOL = 1e-4  # nats (docs/math.md, "Accuracy checks")
K_SE = 3  # Monte Carlo checks: within 3 standard errors


def _oracle(forward_name, dim, getkey, volatility=None):
    mean, cov = gaussian_data(getkey(), dim)
    forward = FORWARDS[forward_name]()
    model = oracle_model(forward, mean, cov, volatility)
    marginal_cov = cov + forward.delta**2 * jnp.eye(dim)
    return model, mean, cov, marginal_cov


@pytest.mark.parametrize("dim", [2, 16])
@pytest.mark.parametrize("forward_name", ["linear", "vp"])
def test_ode_likelihood_matches_closed_form(forward_name, dim, getkey):
    model, mean, _, marginal_cov = _oracle(forward_name, dim, getkey)
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (12,))
    trace = nd.ExactTrace(chunk_size=5 if dim > 5 else None)
    estimate, stats = nd.log_likelihood(model, x, trace=trace, rtol=1e-7, atol=1e-7)
    expected = gaussian_log_prob(x, mean, marginal_cov)
    assert np.max(np.abs(np.asarray(estimate.value) - expected)) <= ORACLE_TOL
    assert np.all(np.asarray(estimate.example_stderr) == 0)
    assert stats.num == 12 and stats.nfe > 0 and stats.accepted_steps > 0


def test_per_example_solve_agrees_with_joint_solve(getkey):
    model, mean, _, marginal_cov = _oracle("linear", 2, getkey)
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (8,))
    joint, joint_stats = nd.log_likelihood(model, x, rtol=1e-8, atol=1e-8)
    alone, alone_stats = nd.log_likelihood(model, x, rtol=1e-8, atol=1e-8, per_example=True)
    expected = gaussian_log_prob(x, mean, marginal_cov)
    for estimate in (joint, alone):
        assert np.max(np.abs(np.asarray(estimate.value) - expected)) <= ORACLE_TOL
    # One solve for the batch takes the step size its hardest example needs.
    assert joint_stats.nfe >= alone_stats.nfe_max - 12


def test_hutchinson_unbiased_and_stderr_shrinks(getkey):
    model, mean, _, marginal_cov = _oracle("linear", 8, getkey)
    num = 32
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (num,))
    exact, _ = nd.log_likelihood(model, x, rtol=1e-6, atol=1e-6)
    se = {}
    cases = [(4, nd.RademacherProbe()), (64, nd.RademacherProbe()), (64, nd.GaussianProbe())]
    for k, distribution in cases:
        trace = nd.Hutchinson(num_probes=k, distribution=distribution)
        est, _ = nd.log_likelihood(model, x, key=getkey(), trace=trace, rtol=1e-6, atol=1e-6)
        # The mean over examples of (estimate - exact) within 3 of its standard errors.
        error = float(jnp.mean(est.value - exact.value))
        error_se = float(jnp.sqrt(jnp.sum(est.example_stderr**2))) / num
        assert abs(error) <= K_SE * error_se
        se[k, type(distribution)] = float(jnp.sqrt(jnp.mean(est.example_stderr**2)))
    # Standard error ~ 1/sqrt(K): 16x the probes, 4x smaller (RMS over examples; the spread of
    # a 4-probe standard deviation is wide, hence the 30% band).
    ratio = se[4, nd.RademacherProbe] / se[64, nd.RademacherProbe]
    assert 4 / 1.3 <= ratio <= 4 * 1.3
    # Rademacher probes have the smaller variance (no diagonal term).
    assert se[64, nd.RademacherProbe] < se[64, nd.GaussianProbe]


def test_variational_bound_is_above_exact_nll(getkey):
    model, mean, cov, marginal_cov = _oracle(
        "linear", 2, getkey, volatility=nd.ConstantVolatility(1.0)
    )
    num = 32
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (num,))
    bound, stats = nd.variational_bound(model, x, key=getkey(), num_samples=64)
    # The stochastic model's data density includes the decoder N(x; z_0, delta^2 I), so its
    # exact NLL is -log N(x; m, S + 2 delta^2 I).
    delta = model.delta
    exact_nll = -gaussian_log_prob(x, mean, cov + 2 * delta**2 * np.eye(2))
    value, stderr = np.asarray(bound.value), np.asarray(bound.example_stderr)
    assert np.all(np.isfinite(value)) and np.all(stderr > 0)
    gap = np.mean(value - exact_nll)
    assert gap >= -K_SE * math.sqrt(np.sum(stderr**2)) / num
    assert stats.nfe == 64


def test_variational_bound_refuses_deterministic_model(getkey):
    model, mean, _, _ = _oracle("linear", 2, getkey)
    with pytest.raises(ValueError, match="g > 0"):
        nd.variational_bound(model, jnp.zeros((3, 2)), key=getkey())


def test_bits_per_dim_of_discrete_data_matches_hand_computation(getkey):
    # A broad Gaussian model in model space (sd ~ 100) over 4 levels mapped to [-1, 1): the
    # density is flat across each bin, so the dequantized bound is tight and the discrete
    # likelihood is, by hand, a product of normal CDF differences over the bins.
    dim, levels, scale, shift, sd = 2, 4, 2.0, -1.0, 100.0
    mean = jnp.zeros(dim)
    cov = sd**2 * jnp.eye(dim)
    forward = nd.LinearInterpolant(delta=0.05)
    model = oracle_model(forward, mean, cov)
    x = jnp.array([[0, 3], [1, 2], [2, 2], [3, 0]])
    deq = nd.Dequantization(num_levels=levels, scale=scale, shift=shift)
    assert deq.offset(dim) == pytest.approx(dim * (math.log(scale) - math.log(levels)), abs=1e-12)
    est, _ = nd.log_likelihood(model, x, key=getkey(), dequantization=deq, rtol=1e-9, atol=1e-9)
    bpd = np.asarray(nd.bits_per_dim(-est.value, dim))

    model_sd = math.sqrt(sd**2 + forward.delta**2)
    low = scale * np.asarray(x) / levels + shift
    high = scale * (np.asarray(x) + 1) / levels + shift
    log_p = np.sum(np.log(norm.cdf(high / model_sd) - norm.cdf(low / model_sd)), axis=1)
    expected = -log_p / (dim * math.log(2))
    assert np.max(np.abs(bpd - expected)) <= 1e-4


def test_dequantization_rejects_out_of_range_data(getkey):
    model, _, _, _ = _oracle("linear", 2, getkey)
    deq = nd.Dequantization(num_levels=4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        nd.log_likelihood(model, jnp.array([[0, 4]]), key=getkey(), dequantization=deq)
    with pytest.raises(ValueError, match="integer"):
        nd.log_likelihood(model, jnp.array([[0.5, 1.0]]), key=getkey(), dequantization=deq)


def test_batch_rms_norm_matches_closed_form_in_no_more_steps(getkey):
    model, mean, _, marginal_cov = _oracle("linear", 2, getkey)
    x = jr.multivariate_normal(getkey(), mean, marginal_cov, (16,))
    x = x.at[0].multiply(6.0)  # one far example: the hardest solve of the batch
    settings = dict(rtol=1e-7, atol=1e-7)
    batch, batch_stats = nd.log_likelihood(model, x, error_norm=nd.ErrorNorm.BATCH_RMS, **settings)
    example, example_stats = nd.log_likelihood(model, x, **settings)
    expected = gaussian_log_prob(x, mean, marginal_cov)
    for estimate in (batch, example):
        assert np.max(np.abs(np.asarray(estimate.value) - expected)) <= ORACLE_TOL
    assert batch_stats.nfe <= example_stats.nfe


def test_estimate_summaries_against_numpy():
    value = jnp.asarray([1.0, 2.0, 4.0, 7.0])
    estimate = nd.Estimate(value, jnp.zeros(4))
    assert estimate.mean() == pytest.approx(3.5)
    assert estimate.stderr() == pytest.approx(np.std([1, 2, 4, 7], ddof=1) / 2)
    assert math.isnan(nd.Estimate(value[:1], jnp.zeros(1)).stderr())


def test_error_norms_against_numpy():
    from nfdm_de._solve import batch_rms, max_example_rms

    z = np.arange(12.0).reshape(3, 4)
    d = np.array([[1.0], [-2.0], [3.0]])
    rows = np.sqrt((np.sum(z**2, axis=1) + np.sum(d**2, axis=1)) / 5)
    assert float(max_example_rms((jnp.asarray(z), jnp.asarray(d)))) == pytest.approx(rows.max())
    overall = math.sqrt((np.sum(z**2) + np.sum(d**2)) / 15)
    assert float(batch_rms((jnp.asarray(z), jnp.asarray(d)))) == pytest.approx(overall)


def test_likelihood_bad_input(getkey):
    model, _, _, _ = _oracle("linear", 2, getkey)
    x = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="shape"):
        nd.log_likelihood(model, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="key"):
        nd.log_likelihood(model, x, trace=nd.Hutchinson(4))
    with pytest.raises(ValueError, match="not both"):
        nd.log_likelihood(model, x, steps=10, rtol=1e-3)
    with pytest.raises(ValueError, match="rtol"):
        nd.log_likelihood(model, x, rtol=0.0)
    # A string for the enum: the ValueError names it (under the tests' runtime type checks,
    # jaxtyping's TypeError comes first).
    with pytest.raises((ValueError, TypeError), match="error_norm|ErrorNorm"):
        nd.log_likelihood(model, x, error_norm="batch-rms")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="not a supported ODE solver"):
        nd.log_likelihood(model, x, solver=dfx.SRA1(), steps=4)
    with pytest.raises(RuntimeError, match="max_steps"):
        nd.log_likelihood(model, x, rtol=1e-10, atol=1e-10, max_steps=3)
    # One probe: an estimate but no spread to measure its standard error by.
    est, _ = nd.log_likelihood(model, x, key=getkey(), trace=nd.Hutchinson(1))
    assert np.all(np.isnan(np.asarray(est.example_stderr))) and np.all(np.isfinite(est.value))


def test_bits_per_dim_conversion():
    assert float(nd.bits_per_dim(jnp.asarray(2 * math.log(2.0)), 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        nd.bits_per_dim(jnp.asarray(1.0), 0)
