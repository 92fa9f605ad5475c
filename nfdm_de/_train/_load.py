"""A trained run, loaded for evaluation: `load_run` and `LoadedRun`."""

import dataclasses
import functools
import os
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from .._bridge import BridgeModel
from .._checkpoint import checkpoint_path, load_checkpoint, read_header
from .._data._transform import (
    AffineDataTransform,
)
from .._model import NFDM
from ._config import TrainConfig
from ._run_dir import (
    CHECKPOINT_DIR,
    UserModelRequired,
    check_header,
    newest_readable,
)
from ._state import TrainState, check_user_model, init_train_state


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A trained run, ready for evaluation.

    - `model`: the NFDM with the EMA weights (cast to the current default float dtype);
    - `config`: the resolved `TrainConfig`;
    - `transform`: the `AffineDataTransform` data -> model space (`to_model`, `from_model`,
      `log_det`); NLL in data units is `nll_model - transform.log_det()`;
    - `dataset`: the built-in dataset name or the data file's path the run was trained on;
    - `num_levels`: K for dequantised integer data (digits: 17), else None; then the transform
      acts on y = (x + u) / K;
    - `step`: the optimiser step of the checkpoint; `path`: its file;
    - `raw_model`: the non-averaged weights.
    """

    model: NFDM | BridgeModel
    config: TrainConfig
    transform: AffineDataTransform
    dataset: str
    num_levels: int | None
    step: int
    path: str
    raw_model: NFDM | BridgeModel
    # Bridges: the source's data -> model transform (None for an NFDM); the source is
    # `config.source`.
    source_transform: AffineDataTransform | None = None
    # (path, reason) of each newer checkpoint that could not be read and was skipped.
    skipped: tuple[tuple[str, str], ...] = ()

    def to_data_units(self, z: Float[ArrayLike, " n *shape"]) -> np.ndarray:
        """Model space -> the data's units (float64); integer data in [0, K) come back as
        integers (the dequantization's floor)."""
        x = np.asarray(self.transform.from_model(jnp.asarray(z)), dtype=np.float64)
        if self.num_levels is not None:
            x = np.clip(np.floor(x * self.num_levels), 0, self.num_levels - 1)
        return x


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def _state_skeleton(
    config: TrainConfig, header: dict[str, Any], like: NFDM | None = None
) -> TrainState:
    data_shape = tuple(header["data_shape"])
    skeleton = eqx.filter_eval_shape(
        lambda model: init_train_state(config, data_shape, model=model), like
    )
    # The checkpoint may have been written in another float precision (float32 outside tests).
    dtype = jnp.dtype(header.get("dtype", "float32"))

    def retype(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jax.ShapeDtypeStruct(leaf.shape, dtype)
        return leaf

    return jax.tree.map(retype, skeleton)


def _load_training_checkpoint(
    path: str, like: NFDM | None = None
) -> tuple[dict[str, Any], TrainConfig, TrainState]:
    """(header, stored config, state) of a checkpoint written by `train`, every header field
    checked before anything is built from it. `like`: a model of the checkpoint's structure
    (needed for a user-built model, whose structure only the user's code knows)."""
    header = read_header(path)
    config = check_header(path, header)
    if header.get("user_model", False) and like is None:
        raise UserModelRequired(
            f"{path!r} holds a user-built model, which only its own code can rebuild: load it "
            "in Python with nd.load_run(run_dir, like=model) (resume: nd.train(config, "
            "run_dir, resume=True, model=model)), `model` built as for training."
        )
    if like is not None:
        check_user_model(like, config, tuple(header["data_shape"]))
    _, state = load_checkpoint(path, _state_skeleton(config, header, like))
    return header, config, state


def load_run(run_dir: str | os.PathLike, *, like: NFDM | None = None) -> LoadedRun:
    """Load the newest readable checkpoint of the run in `run_dir` (EMA weights as `.model`).

    A newer checkpoint that cannot be read (empty, truncated, tampered) is skipped and named in
    `LoadedRun.skipped`; when none can be read the error names the newest and why.

    `like`: for a run of a user-built model (`train(..., model=...)`), a model of the same
    structure, built as for training; its values are replaced by the checkpoint's."""
    run_dir = os.fspath(run_dir)
    directory = os.path.join(run_dir, CHECKPOINT_DIR)
    loaded, skipped = newest_readable(
        directory, functools.partial(_load_training_checkpoint, like=like)
    )
    if loaded is None:
        if skipped:
            path, reason = skipped[0]
            raise ValueError(
                f"no checkpoint of {run_dir!r} can be read; the newest, {path!r}: {reason}"
            )
        raise ValueError(
            f"{run_dir!r} holds no nfdm-de checkpoint (expected {CHECKPOINT_DIR}/step_*.eqx); "
            "train one with `nfdm-de train --run-dir ...`."
        )
    header, config, state = loaded
    dtype = jnp.result_type(float)
    return LoadedRun(
        model=_cast_floats(state.ema_model, dtype),
        config=config,
        transform=_cast_floats(state.transform, dtype),
        dataset=config.data,
        num_levels=header["num_levels"],
        step=header["step"],
        path=checkpoint_path(directory, header["step"]),
        raw_model=_cast_floats(state.model, dtype),
        source_transform=_cast_floats(state.source_transform, dtype),
        skipped=tuple(skipped),
    )
