"""Before the first step of `train`: the data, checked and resolved, and the state to start from
(a fresh one or a restored checkpoint)."""

import dataclasses
import functools
import math
import os

import jax.numpy as jnp
import numpy as np

from .._checkpoint import checkpoint_path
from .._data._loading import (
    IMAGE_DATASETS,
    dataset_num_levels,
    is_file_reference,
    load_dataset,
    load_labels,
)
from .._data._transform import (
    fit_transform,
)
from .._model import NFDM
from ._config import TrainConfig
from ._load import _load_training_checkpoint
from ._run_dir import (
    RunDirectory,
    check_compatible,
    newest_readable,
)
from ._settings import (
    resolve_input_octaves,
    resolve_likelihood_phase,
    resolve_predictor_residual,
)
from ._state import TrainState, init_train_state


@dataclasses.dataclass(frozen=True)
class _Data:
    """A run's training data (in the data's units), validated before anything is written."""

    train: np.ndarray
    source: np.ndarray | None
    num_levels: int | None
    labels: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])


def _with_absolute_paths(config: TrainConfig) -> TrainConfig:
    if is_file_reference(config.data):
        config = dataclasses.replace(config, data=os.path.abspath(config.data))
    if config.source is not None and is_file_reference(config.source):
        config = dataclasses.replace(config, source=os.path.abspath(config.source))
    return config


def _load_data(config: TrainConfig) -> _Data:
    finite = is_file_reference(config.data) or config.data in ("digits", *IMAGE_DATASETS)
    num = None if finite else config.num_train
    data = load_dataset(config.data, split="train", num=num, seed=config.seed)
    num_levels = dataset_num_levels(config.data)
    source_data = None
    if config.source is not None:
        source_num = None if is_file_reference(config.source) else config.num_train
        # The source's own random stream (seed + 1), independent of the target's.
        source_data = load_dataset(
            config.source, split="train", num=source_num, seed=config.seed + 1
        )
        if source_data.shape[1:] != data.shape[1:]:
            raise ValueError(
                f"the source {config.source!r} has examples of shape {source_data.shape[1:]} but "
                f"the target {config.data!r} has {data.shape[1:]}; a bridge needs one dimension."
            )
        if num_levels is not None or dataset_num_levels(config.source) is not None:
            raise ValueError("bridges support continuous data only (no integer-valued sets).")
    labels = load_labels(config.data) if is_file_reference(config.data) else None
    if labels is not None and config.source is not None:
        raise ValueError("a bridge (--source) cannot be class-conditional; drop the labels.")
    return _Data(data, source_data, num_levels, labels)


def _resolve_classes(config: TrainConfig, data: _Data) -> TrainConfig:
    """`num_classes` from the data's labels: K = largest label + 1 unless the config names it."""
    given = config.model.num_classes
    if data.labels is None:
        if given is not None:
            raise ValueError(
                f"num_classes = {given} needs labelled data: a .npz with a 'labels' array."
            )
        return config
    if len(data.shape) != 1:
        raise ValueError(
            f"class-conditional models support vector data; got examples of shape {data.shape}."
        )
    found = int(data.labels.max()) + 1
    if given is not None and found > given:
        raise ValueError(f"the data has labels up to {found - 1}, beyond num_classes = {given}.")
    model = dataclasses.replace(config.model, num_classes=found if given is None else given)
    return dataclasses.replace(config, model=model)


def _resolve_for_data(config: TrainConfig, data: _Data) -> TrainConfig:
    config = _resolve_classes(config, data)
    if config.source is None:  # a bridge's networks take no input features or residual blocks
        model = resolve_input_octaves(config.model, data.shape)
        model = resolve_predictor_residual(model, data.shape)
        config = dataclasses.replace(config, model=model)
    config = resolve_likelihood_phase(config, data.shape, discrete=data.num_levels is not None)
    if config.resolved_likelihood_steps > 0 and (config.source is not None or len(data.shape) != 1):
        raise ValueError(
            "the likelihood phase (likelihood_steps > 0) needs an NFDM on vector data: its exact "
            f"trace costs D network evaluations per ODE step; got data of shape {data.shape}"
            + (" and a bridge (--source)." if config.source is not None else ".")
        )
    return config


@dataclasses.dataclass(frozen=True)
class _Start:
    """Where a call of `train` starts: a fresh state at step 0 or a restored checkpoint."""

    state: TrainState
    step: int
    loss: float
    iterator_state: dict | None = None
    source_iterator_state: dict | None = None
    checkpoint: str | None = None


def _initialise(config: TrainConfig, data: _Data, model: NFDM | None = None) -> _Start:
    transform = fit_transform(config.data, data.train)
    source_transform = None
    if config.source is not None and data.source is not None:  # a bridge
        source_transform = fit_transform(config.source, data.source)
    state = init_train_state(config, data.shape, transform, source_transform, model=model)
    return _Start(state, 0, math.nan)


def _restore(run: RunDirectory, config: TrainConfig, like: NFDM | None = None) -> _Start | None:
    """The newest checkpoint of `run`, checked against `config`; None when there is none. A
    newest checkpoint that cannot be read is an error naming it and the newest readable one.
    `like`: the user-built model the run trains (its structure)."""
    load = functools.partial(_load_training_checkpoint, like=like)
    loaded, skipped = newest_readable(run.checkpoints, load)
    if loaded is None and not skipped:
        return None
    if skipped:
        newest, reason = skipped[0]
        if loaded is None:
            older = "no older checkpoint can be read either"
        else:
            found = checkpoint_path(run.checkpoints, loaded[0]["step"])
            older = f"move it out of {run.checkpoints!r} to resume from {found!r}"
        raise ValueError(f"cannot resume: the newest checkpoint {newest!r}: {reason}; {older}.")
    assert loaded is not None
    header, stored, state = loaded
    latest = checkpoint_path(run.checkpoints, header["step"])
    check_compatible(stored, config, f"checkpoint {latest!r}")
    dtype = jnp.result_type(float)
    if jnp.dtype(header["dtype"]) != dtype:
        raise ValueError(
            f"checkpoint {latest!r} was trained in {header['dtype']}, but this process "
            f"computes in {dtype}; resume in the same precision."
        )
    step = header["step"]
    if step > config.total_steps:
        raise ValueError(
            f"cannot resume {run.path!r} to step {config.total_steps}: its checkpoint is already "
            f"at step {step} (--steps {stored.steps}, --likelihood-steps "
            f"{stored.likelihood_steps}); give at least as many steps."
        )
    if step > stored.steps and config.steps != stored.steps:
        raise ValueError(
            f"cannot change --steps ({stored.steps} -> {config.steps}) of {run.path!r}: its "
            f"likelihood phase has begun (checkpoint at step {step})."
        )
    return _Start(
        state,
        step,
        float(header["loss"]),
        header["data_iterator"],
        header.get("source_iterator"),
        latest,
    )
