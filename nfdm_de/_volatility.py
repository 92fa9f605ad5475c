"""Volatility g(t) >= 0 of the generative SDE. g depends on t only, so noise is additive."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from ._custom_types import Key, Scalar, Time
from ._nn import FourierTimeFeatures, _bias


class AbstractVolatility(eqx.Module):
    """g(t), a non-negative scalar function of time."""

    @abc.abstractmethod
    def __call__(self, t: Time) -> Scalar:
        """g(t)."""

    @property
    def is_zero(self) -> bool:
        """True for the deterministic model (g = 0): the objective switches to the velocity loss."""
        return False


class ZeroVolatility(AbstractVolatility):
    """g = 0: the deterministic model (probability-flow ODE only)."""

    def __call__(self, t: Time) -> Scalar:
        return jnp.zeros_like(jnp.asarray(t, dtype=float))

    @property
    def is_zero(self) -> bool:
        return True


class ConstantVolatility(AbstractVolatility):
    """g(t) = value."""

    value: float = 1.0

    def __check_init__(self):
        if not (isinstance(self.value, int | float) and self.value > 0):
            raise ValueError(
                f"ConstantVolatility needs a positive value (use ZeroVolatility for g = 0); "
                f"got {self.value!r}."
            )

    def __call__(self, t: Time) -> Scalar:
        return jnp.full_like(jnp.asarray(t, dtype=float), self.value)


class LinearScheduleVolatility(AbstractVolatility):
    """A fixed schedule g(t) = g0 + (g1 - g0) t, both ends positive."""

    g0: float = 0.1
    g1: float = 1.0

    def __check_init__(self):
        if not (self.g0 > 0 and self.g1 > 0):
            raise ValueError(
                f"LinearScheduleVolatility needs g0, g1 > 0; got {self.g0}, {self.g1}."
            )

    def __call__(self, t: Time) -> Scalar:
        t = jnp.asarray(t, dtype=float)
        return self.g0 + (self.g1 - self.g0) * t


class LearnedVolatility(AbstractVolatility):
    """g(t) = floor + softplus(NN(t)), a small network of Fourier time features.

    The floor keeps the 1/(2 g^2) weight of the objective finite. The output layer is initialised
    so that g starts at `initial` for every t.
    """

    time_features: FourierTimeFeatures
    hidden: eqx.nn.Linear
    output: eqx.nn.Linear
    floor: float = eqx.field(static=True)

    def __init__(self, *, initial: float = 1.0, floor: float = 1e-2, width: int = 32, key: Key):
        if not (isinstance(floor, int | float) and floor > 0):
            raise ValueError(f"LearnedVolatility `floor` must be > 0; got {floor!r}.")
        if not initial > floor:
            raise ValueError(
                f"LearnedVolatility `initial` must exceed floor={floor}; got {initial}."
            )
        self.floor = floor
        self.time_features = FourierTimeFeatures(4)
        k1, k2 = jr.split(key)
        self.hidden = eqx.nn.Linear(self.time_features.size, width, key=k1)
        output = eqx.nn.Linear(width, "scalar", key=k2)
        # softplus^{-1}(initial - floor), so g(t) = initial at the start of training.
        bias = jnp.log(jnp.expm1(jnp.asarray(initial - floor)))
        self.output = eqx.tree_at(
            lambda layer: (layer.weight, layer.bias),
            output,
            (jnp.zeros_like(output.weight), jnp.full_like(_bias(output), bias)),
        )

    def __call__(self, t: Time) -> Scalar:
        t = jnp.asarray(t, dtype=float)
        h = jnp.tanh(self.hidden(self.time_features(t).astype(self.hidden.weight.dtype)))
        return (self.floor + jax.nn.softplus(self.output(h))).astype(t.dtype)
