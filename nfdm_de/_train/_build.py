"""A `ModelConfig` made into a model: `build_model` and the checks of what a data shape allows."""

from collections.abc import Callable
from typing import Any

import jax.random as jr

from .._custom_types import Key
from .._flow import neural_flow
from .._forward import (
    AbstractForwardProcess,
    LearnedSchedule,
    LinearInterpolant,
    VariancePreserving,
    neural_gaussian,
)
from .._model import NFDM
from .._nn import mlp_predictor
from .._unet import unet_neural_gaussian, unet_predictor
from .._volatility import (
    AbstractVolatility,
    ConstantVolatility,
    LearnedVolatility,
    ZeroVolatility,
)
from ._config import ForwardChoice, ModelConfig, VolatilityChoice
from ._settings import input_octaves_for, predictor_residual_for


def _vector_size(shape, what: str) -> int:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) != 1:
        raise ValueError(f"the {what} forward process works on vectors; got data of shape {shape}.")
    return shape[0]


def _neural_gaussian(c: ModelConfig, shape, k: Key) -> AbstractForwardProcess:
    # Vectors (an int D, or the shape (D,)) get the MLP, images (H, W, C) the U-Net.
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if len(shape) == 3:
        return unet_neural_gaussian(
            shape,
            base_channels=c.channels,
            delta=c.delta,
            anchor=c.forward_anchor,
            key=k,
        )
    return neural_gaussian(
        shape[0],
        width=c.resolved_forward_width,
        depth=c.resolved_forward_depth,
        delta=c.delta,
        input_octaves=c.forward_input_octaves,
        anchor=c.forward_anchor,
        key=k,
    )


# The one place that maps a ForwardChoice to a forward process:
# (config, data shape (or size D), key) -> process.
_FORWARD_BUILDERS: dict[ForwardChoice, Callable[[ModelConfig, Any, Key], AbstractForwardProcess]]


_FORWARD_BUILDERS = {
    ForwardChoice.NEURAL_GAUSSIAN: _neural_gaussian,
    ForwardChoice.LINEAR: lambda c, d, k: LinearInterpolant(delta=c.delta),
    ForwardChoice.VP: lambda c, d, k: VariancePreserving(delta=c.delta),
    ForwardChoice.LEARNED_SCHEDULE: lambda c, d, k: LearnedSchedule(delta=c.delta, key=k),
    ForwardChoice.NEURAL_FLOW: lambda c, d, k: neural_flow(
        _vector_size(d, "neural-flow"), delta=c.delta, key=k
    ),
}


_VOLATILITY_BUILDERS: dict[VolatilityChoice, Callable[[ModelConfig, Key], AbstractVolatility]]


_VOLATILITY_BUILDERS = {
    VolatilityChoice.LEARNED: lambda c, k: LearnedVolatility(initial=c.volatility_value, key=k),
    VolatilityChoice.CONSTANT: lambda c, k: ConstantVolatility(c.volatility_value),
    VolatilityChoice.ZERO: lambda c, k: ZeroVolatility(),
}


def _is_learnable(module) -> bool:
    """Whether `module` holds trainable (floating-point array) leaves; works on the output of
    `eqx.filter_eval_shape` too (Python floats such as `delta` are not trainable)."""
    import jax
    import jax.numpy as jnp

    return any(
        hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)
        for leaf in jax.tree.leaves(module)
    )


def check_model_config(config: ModelConfig, *, forward_is_learnable: bool | None = None) -> None:
    """Refuse a deterministic model (`volatility=zero`) with a learnable forward process and no
    curvature penalty: that objective can be cheated by a degenerate noise schedule
    (docs/math.md, "The bound").

    `forward_is_learnable` defaults to building the forward process abstractly and looking for
    trainable arrays in it, so a new forward process needs no entry here.
    """
    if config.volatility is not VolatilityChoice.ZERO or config.curvature > 0:
        return
    if forward_is_learnable is None:
        import equinox as eqx

        forward = eqx.filter_eval_shape(_FORWARD_BUILDERS[config.forward], config, 2, jr.key(0))
        forward_is_learnable = _is_learnable(forward)
    if forward_is_learnable:
        raise ValueError(
            f"volatility 'zero' with the learnable forward process '{config.forward.value}' needs "
            "a curvature penalty > 0: without one the deterministic objective degenerates (the "
            "learned schedule collapses and injects all noise in a sliver of time; see "
            "docs/math.md, 'The bound'); "
            "use a fixed forward process (linear, vp) or set curvature > 0."
        )


def build_model(config: ModelConfig, data_shape: tuple[int, ...], key: Key) -> NFDM:
    """Build the NFDM described by `config` for examples of shape `data_shape`: vectors `(D,)`
    get MLP networks (`width`, `depth`), images `(H, W, C)` U-Nets (`channels`). An automatic
    `input_octaves` (None) takes its value for `data_shape` (`input_octaves_for`), and so does
    an automatic `predictor_residual` (`predictor_residual_for`).

    Refuses a deterministic model (`volatility=zero`) with a learnable forward process and no
    curvature penalty: that objective can be cheated by a degenerate noise schedule
    (docs/math.md, "The bound").
    """
    if not isinstance(config, ModelConfig):
        raise ValueError(f"`config` must be a ModelConfig; got {type(config).__name__}.")
    data_shape = tuple(int(n) for n in data_shape)
    if len(data_shape) not in (1, 3) or min(data_shape) < 1:
        raise ValueError(
            "build_model supports vector data of shape (D,) and image data of shape (H, W, C); "
            f"got {data_shape}."
        )
    forward_key, predictor_key, volatility_key = jr.split(key, 3)
    forward = _FORWARD_BUILDERS[config.forward](config, data_shape, forward_key)
    check_model_config(config, forward_is_learnable=_is_learnable(forward))
    if len(data_shape) == 3:
        if config.num_classes is not None:
            raise ValueError(
                "class-conditional models support vector data (an MLP predictor); got images "
                f"of shape {data_shape}."
            )
        predictor = unet_predictor(
            data_shape,
            base_channels=config.channels,
            delta=config.delta,
            skip=config.predictor_skip,
            key=predictor_key,
        )
    else:
        predictor = mlp_predictor(
            data_shape[0],
            width=config.width,
            depth=config.depth,
            delta=config.delta,
            input_octaves=input_octaves_for(config, data_shape),
            residual=predictor_residual_for(config, data_shape),
            skip=config.predictor_skip,
            num_classes=config.num_classes,
            key=predictor_key,
        )
    volatility = _VOLATILITY_BUILDERS[config.volatility](config, volatility_key)
    return NFDM(forward, predictor, volatility, data_shape=data_shape)
