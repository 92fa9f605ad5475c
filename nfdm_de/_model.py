"""The NFDM model: a forward process, a data predictor and a volatility."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._custom_types import Data, Network, Scalar, Time
from ._forward import AbstractForwardProcess
from ._nn import Predictor, PredictorSkipChoice
from ._volatility import AbstractVolatility


class AbstractDiffusionModel(eqx.Module):
    """What NFDM and a bridge share: a forward process, a predictor and a volatility g(t) on
    examples of `data_shape`."""

    forward: eqx.AbstractVar[AbstractForwardProcess]
    predictor: eqx.AbstractVar[Network]
    volatility: eqx.AbstractVar[AbstractVolatility]
    data_shape: eqx.AbstractVar[tuple[int, ...]]

    @property
    def delta(self) -> float:
        """The forward process's delta: the data-end noise scale."""
        return self.forward.delta

    @property
    def is_deterministic(self) -> bool:
        """g = 0: the generative SDE is the probability-flow ODE, and there is no bound."""
        return self.volatility.is_zero


class NFDM(AbstractDiffusionModel):
    """A Neural Flow Diffusion Model.

    The generative dynamics plug the predictor x_hat(z, t) into the forward process's conditional
    fields (docs/math.md, "The generative process"):

    - ODE (probability flow):   dz/dt = v(z, t) = f(z, t, x_hat(z, t))
    - SDE (run from t=1 to 0):  dz = f^B(z, t, x_hat(z, t)) dt + g(t) dw_bar

    Both share the one predictor. For a fixed Gaussian path (linear, VP) f and f^B are affine
    in x, so the x_hat that makes the SDE drift exact (the posterior mean, which the bound
    trains for) makes the ODE exact too. For a learnable forward process they are not, and no
    single x_hat makes both exact: a model trained on the bound alone has a biased
    probability-flow ODE even with a perfect predictor
    (`tests/test_probability_flow_oracle.py`).

    **Arguments:**

    - `forward`: any `AbstractForwardProcess`.
    - `predictor`: any module `(z, t) -> x_hat` on one example. A library `Predictor` is
      called with the forward process's `reference_path(t)` (or, for the `gaussian-full`
      skip, its `skip_path(t, z)`) as well, which its skip connection is built on (`predict`).
    - `volatility`: any `AbstractVolatility`.
    - `data_shape`: the shape of one example. Inferred from an MLP predictor when omitted.
    """

    forward: AbstractForwardProcess
    predictor: Network
    volatility: AbstractVolatility
    data_shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(
        self,
        forward: AbstractForwardProcess,
        predictor: Network,
        volatility: AbstractVolatility,
        *,
        data_shape: tuple[int, ...] | None = None,
    ):
        if not isinstance(forward, AbstractForwardProcess):
            raise ValueError(
                f"`forward` must be an AbstractForwardProcess; got {type(forward).__name__}."
            )
        if not isinstance(volatility, AbstractVolatility):
            raise ValueError(
                f"`volatility` must be an AbstractVolatility; got {type(volatility).__name__}."
            )
        if data_shape is None:
            in_size = getattr(getattr(predictor, "network", None), "in_size", None)
            if in_size is None:
                raise ValueError(
                    "NFDM could not infer `data_shape` from the predictor; pass data_shape=(...)."
                )
            data_shape = (in_size,)
        self.forward = forward
        self.predictor = predictor
        self.volatility = volatility
        self.data_shape = tuple(int(n) for n in data_shape)
        self._check_shapes()

    def _check_shapes(self) -> None:
        # Trace (without computing) one velocity and one forward-process evaluation, so that
        # networks built for another dimension fail here with a clear message. In the
        # parameters' dtype when they share one (a float32 model in a float64 process): strict
        # dtype promotion refuses a float64 probe through float32 weights.
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(eqx.filter(self, eqx.is_inexact_array))}
        dtype = dtypes.pop() if len(dtypes) == 1 else jnp.result_type(float)
        z = jax.ShapeDtypeStruct(self.data_shape, dtype)
        t = jax.ShapeDtypeStruct((), dtype)
        try:
            out = eqx.filter_eval_shape(lambda m, z, t: m.velocity(z, t), self, z, t)
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"NFDM parts do not fit data of shape {self.data_shape}: {error}"
            ) from None
        if out.shape != self.data_shape:
            raise ValueError(
                f"NFDM velocity has shape {out.shape} but the data shape is {self.data_shape}."
            )

    def predict(self, z: Data, t: Time) -> Data:
        """x_hat(z, t). A library `Predictor` is preconditioned on the forward process's
        reference path (`gaussian` skip) or on its path at the data mean (`gaussian-full`);
        any other module is called as `predictor(z, t)`."""
        if isinstance(self.predictor, Predictor):
            if self.predictor.skip is PredictorSkipChoice.GAUSSIAN_FULL:
                return self.predictor(z, t, self.forward.skip_path(t, z))
            return self.predictor(z, t, self.forward.reference_path(t))
        return self.predictor(z, t)

    def velocity(self, z: Data, t: Time) -> Data:
        """v(z, t) = f(z, t, x_hat(z, t)): the generative (probability-flow) ODE."""
        return self.forward.velocity(z, t, self.predict(z, t))

    def drift(self, z: Data, t: Time) -> Data:
        """f_hat(z, t) = f^B(z, t, x_hat(z, t)): the generative SDE's drift in forward time t."""
        return self.forward.backward_drift(z, t, self.predict(z, t), self.volatility(t))

    def diffusion(self, t: Time) -> Scalar:
        """g(t), the additive noise scale of the generative SDE."""
        return self.volatility(t)

    def reconstruction_nll(self) -> float:
        """-E_{q(z_0|x)} log p(x | z_0) with the decoder p(x | z_0) = N(x; z_0, delta^2 I).

        Since z_0 = x + delta * eps, the expectation is closed form: D/2 (log(2 pi delta^2) + 1).
        """
        size = math.prod(self.data_shape)
        return 0.5 * size * (math.log(2 * math.pi * self.delta**2) + 1.0)
