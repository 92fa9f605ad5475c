"""The Gaussian oracle: data N(m, S), a Gaussian forward process mu = a(t) x, sigma = s(t), and
the exact posterior-mean predictor x_hat(z, t) = E[x | z_t = z].

With z = a x + s eps, E[x | z] = m + S a (a^2 S + s^2 I)^{-1} (z - a m). Every conditional field
of a Gaussian path is affine in x, so plugging in the posterior mean gives the exact marginal
velocity and score: the model's t-marginal is N(a m, a^2 S + s^2 I) for every t, and its t = 0
density is N(m, S + delta^2 I) in closed form.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import nfdm_de as nd


def path_coefficients(forward, t, data_size):
    """a(t) and s(t) of a Gaussian path mu = a(t) x, sigma = s(t), read from the process itself:
    mu(1, t) = a(t), log sigma = log s(t)."""
    mu, log_sigma = forward.mean_and_log_scale(jnp.ones((data_size,), jnp.asarray(t).dtype), t)
    return mu[0], jnp.exp(log_sigma[0])


class PosteriorMean(eqx.Module):
    forward: nd.AbstractGaussianForwardProcess
    mean: jnp.ndarray
    cov: jnp.ndarray

    def coefficients(self, t):
        return path_coefficients(self.forward, t, self.mean.shape[0])

    def __call__(self, z, t):
        t = jnp.asarray(t, z.dtype)
        a, s = self.coefficients(t)
        eye = jnp.eye(self.mean.shape[0], dtype=z.dtype)
        marginal_cov = a**2 * self.cov + s**2 * eye
        return self.mean + a * self.cov @ jnp.linalg.solve(marginal_cov, z - a * self.mean)


def gaussian_data(key, dim):
    """A mean and a well-conditioned, correlated covariance in `dim` dimensions."""
    k1, k2 = jr.split(key)
    mean = jr.normal(k1, (dim,), jnp.float64)
    factor = jr.normal(k2, (dim, dim), jnp.float64) / math.sqrt(dim)
    cov = 0.5 * factor @ factor.T + 0.5 * jnp.eye(dim, dtype=jnp.float64)
    return mean, cov


def oracle_model(forward, mean, cov, volatility=None):
    volatility = nd.ZeroVolatility() if volatility is None else volatility
    predictor = PosteriorMean(forward, mean, cov)
    return nd.NFDM(forward, predictor, volatility, data_shape=(mean.shape[0],))


def gaussian_log_prob(x, mean, cov):
    """log N(x; mean, cov) row by row, in numpy float64."""
    x, mean, cov = (np.asarray(a, np.float64) for a in (x, mean, cov))
    dim = mean.shape[0]
    diff = x - mean
    _, logdet = np.linalg.slogdet(cov)
    quad = np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff)
    return -0.5 * (quad + logdet + dim * math.log(2 * math.pi))


FORWARDS = {
    "linear": lambda: nd.LinearInterpolant(delta=0.05),
    "vp": lambda: nd.VariancePreserving(delta=0.05),
}


class MarkovVolatility(nd.AbstractVolatility):
    """g(t) of the Markov diffusion whose marginals are the path's: g^2 = d(s^2)/dt - 2 s^2
    d(log a)/dt for mu = a(t) x, sigma = s(t). With it the forward process conditioned on x is
    the Markov diffusion's bridge, which is what makes the bound of a fixed Gaussian path with
    the posterior-mean predictor schedule-independent (see `test_bound_oracle.py`)."""

    forward: nd.AbstractGaussianForwardProcess
    data_size: int = eqx.field(static=True)

    def __call__(self, t):
        def coefficients(t):
            a, s = path_coefficients(self.forward, t, self.data_size)
            return a, s**2

        t = jnp.asarray(t, float)
        (a, variance), (da, dvariance) = jax.jvp(coefficients, (t,), (jnp.ones_like(t),))
        return jnp.sqrt(dvariance - 2 * variance * da / a)
