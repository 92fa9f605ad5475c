"""The hand-written time derivative of the reference MLP and of the learnable forward process
(what the train step uses) against forward-mode autodiff, values and gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import perturb

import nfdm_de as nd
from nfdm_de._forward import AbstractGaussianForwardProcess

TIMES = [0.0, 0.037, 0.5, 0.91, 1.0]


def _autodiff_rate(net, x, t):
    return jax.jvp(lambda s: net(x, s), (jnp.asarray(t),), (jnp.ones(()),))


@pytest.mark.parametrize("depth, octaves", [(1, 0), (3, 0), (2, 3)])
def test_mlp_time_derivative_matches_forward_mode_autodiff(getkey, depth, octaves):
    net = nd.TimeConditionedMLP(3, 5, width=16, depth=depth, input_octaves=octaves, key=getkey())
    net = perturb(net, getkey())
    for t in TIMES:
        x = jr.normal(getkey(), (3,))
        value, rate = net.value_and_time_derivative(x, t)
        want_value, want_rate = _autodiff_rate(net, x, t)
        np.testing.assert_allclose(value, want_value, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(rate, want_rate, rtol=1e-11, atol=1e-11)
        assert float(jnp.max(jnp.abs(rate))) > 1e-3  # the check is not between two zeros


def test_mlp_time_derivative_refuses_a_wrong_shape(getkey):
    net = nd.TimeConditionedMLP(3, 5, width=8, depth=1, key=getkey())
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        net.value_and_time_derivative(jnp.zeros(4), 0.5)


@pytest.mark.parametrize("anchor", list(nd.AnchorChoice))
def test_neural_gaussian_rates_match_autodiff_in_value_and_gradient(getkey, anchor):
    """`NeuralGaussian._moments_and_rates` uses the MLP's written-out derivative; the base class
    takes `jax.jvp` of `mean_and_log_scale`. Both the four arrays and the gradient of a loss
    built from them (the backward pass training runs) agree to float64 rounding."""
    process = nd.neural_gaussian(4, width=16, depth=2, anchor=anchor, key=getkey())
    process = perturb(process, getkey())
    x = jr.normal(getkey(), (4,))

    def summary(p, t, fast):
        rates = (
            p._moments_and_rates(x, t)
            if fast
            else AbstractGaussianForwardProcess._moments_and_rates(p, x, t)
        )
        return sum(jnp.sum(jnp.sin(r) * (i + 1)) for i, r in enumerate(rates))

    for t in TIMES:
        fast = process._moments_and_rates(x, t)
        slow = AbstractGaussianForwardProcess._moments_and_rates(process, x, t)
        for a, b in zip(fast, slow, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        g_fast = eqx.filter_grad(lambda p, t=t: summary(p, t, True))(process)
        g_slow = eqx.filter_grad(lambda p, t=t: summary(p, t, False))(process)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert float(jnp.max(jnp.abs(fast[2] - slow[2]))) < 1e-12


def test_a_user_network_keeps_the_autodiff_rates(getkey):
    """Any other network (here an MLP wrapped in a user module) is differentiated by jax.jvp."""

    class Wrapped(eqx.Module):
        inner: nd.TimeConditionedMLP

        def __call__(self, x, t):
            return self.inner(x, t)

    mlp = perturb(nd.TimeConditionedMLP(2, 4, width=8, depth=1, key=getkey()), getkey())
    fast = nd.NeuralGaussian(network=mlp)
    wrapped = nd.NeuralGaussian(network=Wrapped(mlp))
    x = jr.normal(getkey(), (2,))
    for a, b in zip(
        fast._moments_and_rates(x, 0.3), wrapped._moments_and_rates(x, 0.3), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
