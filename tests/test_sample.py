"""Sampling (float64): the Gaussian oracle's moments, convergence orders of fixed-step solvers,
honest NFE against an instrumented count of vector-field evaluations, and bad settings."""

import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from gaussian_oracle import FORWARDS, PosteriorMean, gaussian_data, oracle_model

import nfdm_de as nd

K_SE = 4  # Monte Carlo checks: within 4 standard errors (many entries are checked at once)


def _moments_within_error(samples, mean, cov):
    samples = np.asarray(samples)
    n = samples.shape[0]
    mean, cov = np.asarray(mean), np.asarray(cov)
    mean_se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(samples.mean(0) - mean) <= K_SE * mean_se)
    # Var of a sample covariance entry (Gaussian): (S_ii S_jj + S_ij^2) / n.
    cov_se = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    assert np.all(np.abs(np.cov(samples.T) - cov) <= K_SE * cov_se)


@pytest.mark.parametrize(
    "sde, solver, steps",
    [(False, dfx.Tsit5(), None), (True, dfx.Euler(), 100)],
)
def test_oracle_samples_have_the_analytic_moments(sde, solver, steps, getkey):
    mean, cov = gaussian_data(getkey(), 2)
    forward = FORWARDS["linear"]()
    volatility = nd.ConstantVolatility(1.0) if sde else None
    model = oracle_model(forward, mean, cov, volatility)
    kwargs = dict(steps=steps) if steps else dict(rtol=1e-4, atol=1e-4)
    samples, stats = nd.sample(model, 4000, key=getkey(), solver=solver, sde=sde, **kwargs)
    assert samples.shape == (4000, 2)
    _moments_within_error(samples, mean, cov + forward.delta**2 * np.eye(2))
    assert stats.num == 4000 and stats.nfe > 0


def test_fixed_step_convergence_orders(getkey):
    # Euler is first order and Heun second: doubling the steps halves / quarters the error
    # against a tight Dopri8 solve from the same noise.
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["vp"](), mean, cov)
    key = getkey()
    reference, _ = nd.sample(model, 32, key=key, solver=dfx.Dopri8(), rtol=1e-11, atol=1e-11)
    for solver, order in ((dfx.Euler(), 1.0), (dfx.Heun(), 2.0)):
        errors = []
        for steps in (32, 64):
            approx, _ = nd.sample(model, 32, key=key, solver=solver, steps=steps)
            errors.append(float(jnp.max(jnp.abs(approx - reference))))
        observed = math.log2(errors[0] / errors[1])
        assert abs(observed - order) <= 0.25, (type(solver).__name__, observed)


class CountingPredictor(eqx.Module):
    """Wraps a predictor; every evaluation of the (batched) vector field bumps a host counter."""

    inner: PosteriorMean
    counter: list = eqx.field(static=True)

    def __call__(self, z, t):
        # No arguments: under vmap the callback then runs once per batched evaluation.
        jax.debug.callback(self._bump)
        return self.inner(z, t)

    def _bump(self):
        self.counter[0] += 1


def _counting_model(getkey, volatility=None):
    mean, cov = gaussian_data(getkey(), 2)
    counter = [0]
    inner = PosteriorMean(FORWARDS["linear"](), mean, cov)
    model = nd.NFDM(
        inner.forward,
        CountingPredictor(inner, counter),
        volatility or nd.ZeroVolatility(),
        data_shape=(2,),
    )
    return model, counter


ODE_CASES = [(s, steps) for s in nd._solve.ODE_SOLVERS for steps in (5, None)]
ODE_CASES = [(s, steps) for s, steps in ODE_CASES if not (s is dfx.Euler and steps is None)]


@pytest.mark.slow
@pytest.mark.parametrize("solver_type, steps", ODE_CASES)
def test_ode_nfe_matches_instrumented_count(solver_type, steps, getkey):
    model, counter = _counting_model(getkey)
    kwargs = dict(steps=steps) if steps else dict(rtol=1e-6, atol=1e-6)
    key = getkey()
    # Callbacks run when the compiled solve runs, not while it is traced: one call suffices.
    _, stats = nd.sample(model, 3, key=key, solver=solver_type(), **kwargs)
    assert stats.nfe == counter[0]
    if steps is None:
        assert stats.accepted_steps + stats.rejected_steps > 1


SDE_CASES = [
    (dfx.Euler, 6),
    (dfx.Heun, 6),
    (dfx.SRA1, 6),
    (dfx.ShARK, 6),
    (dfx.SEA, 6),
    (dfx.Heun, None),
    (dfx.SRA1, None),
    (dfx.ShARK, None),
]


@pytest.mark.slow
@pytest.mark.parametrize("solver_type, steps", SDE_CASES)
def test_sde_nfe_matches_instrumented_count(solver_type, steps, getkey):
    model, counter = _counting_model(getkey, nd.ConstantVolatility(1.0))
    kwargs = dict(steps=steps) if steps else dict(rtol=1e-3, atol=1e-3)
    key = getkey()
    _, stats = nd.sample(model, 3, key=key, solver=solver_type(), sde=True, **kwargs)
    assert stats.nfe == counter[0]
    if steps is None:
        assert stats.rejected_steps >= 0 and stats.accepted_steps > 1


@pytest.mark.parametrize(
    "trace, kwargs",
    [
        (nd.ExactTrace(), dict(rtol=1e-6, atol=1e-6)),
        (nd.Hutchinson(3), dict(solver=dfx.Tsit5(), steps=4)),
    ],
)
def test_likelihood_nfe_matches_instrumented_count(trace, kwargs, getkey):
    model, counter = _counting_model(getkey)
    x = jr.normal(getkey(), (5, 2))
    key = getkey()
    _, stats = nd.log_likelihood(model, x, key=key, trace=trace, **kwargs)
    assert stats.nfe == counter[0]


def test_per_example_nfe_is_each_examples_own_count(getkey):
    model, counter = _counting_model(getkey)
    x = jr.normal(getkey(), (1, 2))
    _, stats = nd.log_likelihood(model, x, per_example=True)
    assert stats.nfe == stats.nfe_max == counter[0]


def test_fixed_step_sde_does_not_build_a_virtual_brownian_tree(getkey, monkeypatch):
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["linear"](), mean, cov, nd.ConstantVolatility(1.0))

    def refuse(*args, **kwargs):
        raise AssertionError("VirtualBrownianTree built for a fixed-step solve")

    monkeypatch.setattr(dfx, "VirtualBrownianTree", refuse)
    key = getkey()
    first, _ = nd.sample(model, 8, key=key, solver=dfx.Euler(), sde=True, steps=10)
    again, _ = nd.sample(model, 8, key=key, solver=dfx.Euler(), sde=True, steps=10)
    assert jnp.array_equal(first, again)  # reproducible from the key
    with pytest.raises(AssertionError, match="VirtualBrownianTree"):
        nd.sample(model, 8, key=key, solver=dfx.ShARK(), sde=True, rtol=1e-3, atol=1e-3)


def test_trajectories_end_at_the_samples(getkey):
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["linear"](), mean, cov)
    key = getkey()
    samples, _ = nd.sample(model, 4, key=key, solver=dfx.Heun(), steps=8)
    t, path, _ = nd.sample_trajectories(model, 4, key=key, num_points=9, solver=dfx.Heun(), steps=8)
    assert path.shape == (9, 4, 2) and float(t[0]) == 1.0 and float(t[-1]) == 0.0
    assert float(jnp.max(jnp.abs(path[-1] - samples))) <= 1e-8


def test_bad_sampler_settings(getkey):
    mean, cov = gaussian_data(getkey(), 2)
    model = oracle_model(FORWARDS["linear"](), mean, cov, nd.ConstantVolatility(1.0))
    key = getkey()
    with pytest.raises(ValueError, match="not both"):
        nd.sample(model, 2, key=key, steps=4, rtol=1e-3)
    with pytest.raises(ValueError, match="fixed-step solver"):
        nd.sample(model, 2, key=key, solver=dfx.Euler(), rtol=1e-3)
    with pytest.raises(ValueError, match="step count"):
        nd.sample(model, 2, key=key, solver=dfx.Euler())
    with pytest.raises(ValueError, match="fixed-step solver"):
        nd.sample(model, 2, key=key, solver=dfx.SEA(), sde=True, atol=1e-3)
    with pytest.raises(ValueError, match="positive"):
        nd.sample(model, 2, key=key, rtol=-1.0)
    with pytest.raises(ValueError, match="not a supported SDE solver"):
        nd.sample(model, 2, key=key, solver=dfx.Tsit5(), sde=True, steps=4)
    with pytest.raises(ValueError, match="num"):
        nd.sample(model, 0, key=key)
    with pytest.raises(RuntimeError, match="max_steps"):
        nd.sample(model, 2, key=key, rtol=1e-12, atol=1e-12, max_steps=2)
