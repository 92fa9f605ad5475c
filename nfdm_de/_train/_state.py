"""The train state: model, EMA model, optimiser state, key and data transforms."""

from typing import Any

import equinox as eqx
import jax.random as jr
from jaxtyping import Array, UInt

from .._bridge import BridgeModel, build_bridge_model
from .._data._transform import (
    AffineDataTransform,
)
from .._model import NFDM
from ._build import build_model
from ._config import TrainConfig
from ._optimizer import make_optimizer


class TrainState(eqx.Module):
    """Everything a checkpoint holds besides its JSON header (step, data-iterator state)."""

    model: NFDM | BridgeModel
    ema_model: NFDM | BridgeModel
    opt_state: Any
    key: UInt[Array, "..."]  # raw key data of the training stream (jr.key_data)
    transform: AffineDataTransform
    # A bridge's source data -> model space (None for an NFDM: no leaves, so NFDM checkpoints
    # are unchanged).
    source_transform: AffineDataTransform | None = None


def _params(model):
    return eqx.filter(model, eqx.is_inexact_array)


def check_user_model(model, config: TrainConfig, data_shape: tuple[int, ...]) -> None:
    """The ValueError a user-built `model` for `train` raises: not an NFDM, a bridge's config,
    or another data shape."""
    if not isinstance(model, NFDM):
        raise ValueError(f"`model` must be an nfdm_de.NFDM; got {type(model).__name__}.")
    if config.source is not None:
        raise ValueError("a user-built `model` trains as an NFDM; give no `source` (bridge).")
    if tuple(model.data_shape) != tuple(data_shape):
        raise ValueError(
            f"the model is built for examples of shape {tuple(model.data_shape)}, but the data "
            f"{config.data!r} has examples of shape {tuple(data_shape)}."
        )
    labelled = config.model.num_classes is not None
    if model.is_conditional != labelled:
        raise ValueError(
            f"the data {config.data!r} has class labels but the model's predictor takes no context"
            if labelled
            else f"the model is conditional but the data {config.data!r} "
            "has no class labels (a .npz with a 'labels' array)"
        )


def init_train_state(
    config: TrainConfig,
    data_shape: tuple[int, ...],
    transform: AffineDataTransform | None = None,
    source_transform: AffineDataTransform | None = None,
    *,
    model: NFDM | None = None,
) -> TrainState:
    """A fresh state: model from `config.model` and `config.seed`, EMA = model, optimiser state.

    With `config.source` set the model is a `BridgeModel` and the state holds the source's
    transform too. `model`: a user-built NFDM for data of `data_shape` to start from instead
    (its own predictor, forward process or volatility); `config.model` is then not used."""
    model_key, train_key = jr.split(jr.key(config.seed))
    built: NFDM | BridgeModel
    if model is not None:
        check_user_model(model, config, data_shape)
        built, source_transform = model, None
    elif config.source is not None:
        built = build_bridge_model(config.model, data_shape, model_key)
        if source_transform is None:
            source_transform = AffineDataTransform.identity(data_shape[0])
    else:
        built = build_model(config.model, data_shape, model_key)
        source_transform = None
    optimizer = make_optimizer(config.optim)
    opt_state = optimizer.init(_params(built))
    if transform is None:
        transform = AffineDataTransform.identity(tuple(data_shape))
    return TrainState(built, built, opt_state, jr.key_data(train_key), transform, source_transform)
