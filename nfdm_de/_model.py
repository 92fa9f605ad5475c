"""The NFDM model: a forward process, a data predictor and a volatility."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ._custom_types import Context, Data, Network, Scalar, Time
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
      A conditional predictor takes the context last, `(z, t, c)`; it declares itself with an
      `example_context()` method returning a context of the right shape (as `Predictor`
      around a `ContextMLP` does).
    - `volatility`: any `AbstractVolatility`.
    - `data_shape`: the shape of one example. Inferred from an MLP predictor when omitted.

    **Conditional models.** With a conditional predictor the model is p(x | c):
    `conditioned(c)` fixes the context of one example and returns an NFDM to which `loss`,
    `sample` and `log_likelihood` apply unchanged; those functions also take a batch of
    per-example contexts (`context=`). The forward process q(z_t | x) does not see c: x
    already carries it.
    """

    forward: AbstractForwardProcess
    predictor: Network
    volatility: AbstractVolatility
    data_shape: tuple[int, ...] = eqx.field(static=True)
    context: Context | None

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
        self.context = None
        self._check_shapes()

    @property
    def is_conditional(self) -> bool:
        """Whether the predictor takes a context (see `example_context`)."""
        return self.example_context() is not None

    def example_context(self) -> Context | None:
        """A context of the predictor's shape and dtype, or None for an unconditional model."""
        example = getattr(self.predictor, "example_context", None)
        return None if example is None else example()

    def conditioned(self, context: Context) -> "NFDM":
        """This model with the context of one example fixed: p(x | c) as an NFDM."""
        example = self.example_context()
        if example is None:
            raise ValueError("this model is unconditional: its predictor takes no context.")
        context = jnp.asarray(context)
        if context.shape != example.shape:
            raise ValueError(
                f"a context of this model has shape {example.shape}; got {context.shape}."
            )
        return eqx.tree_at(lambda m: m.context, self, context, is_leaf=lambda x: x is None)

    def _check_shapes(self) -> None:
        # Trace (without computing) one velocity and one forward-process evaluation, so that
        # networks built for another dimension fail here with a clear message. In the
        # parameters' dtype when they share one (a float32 model in a float64 process): strict
        # dtype promotion refuses a float64 probe through float32 weights.
        dtypes = {leaf.dtype for leaf in jax.tree.leaves(eqx.filter(self, eqx.is_inexact_array))}
        dtype = dtypes.pop() if len(dtypes) == 1 else jnp.result_type(float)
        z = jax.ShapeDtypeStruct(self.data_shape, dtype)
        t = jax.ShapeDtypeStruct((), dtype)
        example = self.example_context()
        model = self if example is None else self.conditioned(example)
        try:
            out = eqx.filter_eval_shape(lambda m, z, t: m.velocity(z, t), model, z, t)
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
        any other module is called as `predictor(z, t)`; the context, when set, comes last."""
        context = () if self.context is None else (self.context,)
        if isinstance(self.predictor, Predictor):
            if self.predictor.skip is PredictorSkipChoice.GAUSSIAN_FULL:
                return self.predictor(z, t, self.forward.skip_path(t, z), *context)
            return self.predictor(z, t, self.forward.reference_path(t), *context)
        return self.predictor(z, t, *context)

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


def check_context(model: NFDM, context: Array | None, batch: int) -> None:
    """A batch of per-example contexts fits `model` and `batch` examples (None: unconditional)."""
    example = model.example_context()
    if context is None:
        if example is not None and model.context is None:
            raise ValueError(
                "this model is conditional: pass one context per example (`context=`), or "
                "condition it first (`model.conditioned(c)`)."
            )
        return
    if example is None:
        raise ValueError("`context` was given, but this model is unconditional.")
    if model.context is not None:
        raise ValueError("this model is already conditioned; pass no `context`.")
    expected = (batch, *example.shape)
    if tuple(context.shape) != expected:
        raise ValueError(
            f"expected one context of shape {example.shape} per example, {expected}; got "
            f"{tuple(context.shape)}."
        )
    if jnp.issubdtype(example.dtype, jnp.integer) != jnp.issubdtype(context.dtype, jnp.integer):
        raise ValueError(
            f"this model's contexts are {example.dtype.name} (class labels are integers); got "
            f"{context.dtype.name}."
        )
