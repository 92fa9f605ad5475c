"""The run directory of a training run, as an object, and the checks on what it holds.

    config.json        the resolved `TrainConfig` (JSON)
    metrics.jsonl      one JSON object per logged interval, up to the newest checkpoint
    checkpoints/       step_XXXXXXXX.eqx, the last `keep` of them (see `_checkpoint`)

What a save point writes, in order: the checkpoint, then `config.json` (when it changed), then
`metrics.jsonl`, then old checkpoints are deleted. Each write is atomic, so a failed save
(disk full, permission denied) leaves the previous checkpoint, config and metrics as they were.
The tool deletes only files it wrote: checkpoints (regular files in the run's own
`checkpoints/`, which must not be a link out of the run directory) and the temporaries of killed
writes.
"""

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from .._checkpoint import checkpoint_path, list_checkpoints, save_checkpoint
from .._files import atomic_write_bytes, existing_directory_above, remove_stale_temporaries
from ._config import TrainConfig, config_differences
from ._settings import DATA_RESOLVED_MODEL_SETTINGS

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
FLOAT_DTYPES = ("float32", "float64")

T = TypeVar("T")


def read_run_config(run_dir: str) -> TrainConfig | None:
    """The resolved config stored in `run_dir`, or None when there is none."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            stored = json.loads(f.read())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the run config {path!r}: {error}") from None
    if not isinstance(stored, dict):  # from_dict takes a dict: JSON may hold anything
        raise ValueError(
            f"the run config {path!r} holds {type(stored).__name__} {stored!r:.40}, not a JSON "
            "object of settings."
        )
    try:
        return TrainConfig.from_dict(stored)
    except ValueError as error:
        raise ValueError(f"the run config {path!r} is invalid: {error}") from None


def check_run_directory(run_dir: str, config: TrainConfig, resume: bool) -> None:
    """Refuse to overwrite anything: a non-empty directory needs `resume`, and then must hold a
    run whose config matches in every non-resumable field. A path that cannot become a
    directory, and a `checkpoints` that is not a directory of this run, are refused too."""
    _check_creatable(run_dir)
    if not os.path.exists(run_dir) or not os.listdir(run_dir):
        return
    stored = read_run_config(run_dir)
    if not resume:
        what = "a run" if stored is not None else "other files"
        raise ValueError(
            f"run directory {run_dir!r} already holds {what}; pass --resume to continue it or "
            "choose a new --run-dir."
        )
    if stored is None:
        raise ValueError(
            f"cannot resume: {run_dir!r} is not empty and holds no nfdm-de run ({CONFIG_FILE})."
        )
    # Settings resolved once the data are known take the stored values when left automatic; the
    # data are checked after loading.
    automatic = {
        name: getattr(stored.model, name)
        for name in DATA_RESOLVED_MODEL_SETTINGS
        if getattr(config.model, name) is None
    }
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **automatic))
    check_compatible(stored, config, f"the run in {run_dir!r}")
    checkpoints = os.path.join(run_dir, CHECKPOINT_DIR)
    if os.path.lexists(checkpoints):
        inside = os.path.realpath(checkpoints).startswith(os.path.realpath(run_dir) + os.sep)
        if not os.path.isdir(checkpoints) or not inside:
            what = "a link out of the run directory" if not inside else "not a directory"
            raise ValueError(
                f"{checkpoints!r} is {what}; nfdm-de keeps a run's checkpoints in a directory of "
                "its own inside the run directory. Move it away to resume."
            )


def _check_creatable(run_dir: str) -> None:
    """`run_dir` is a writable directory or can be created as one."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run directory {run_dir!r} exists and is not a directory.")
    if os.path.isdir(run_dir):
        existing = run_dir
    else:
        existing = existing_directory_above(run_dir, "create run directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write run directory {run_dir!r}: {existing!r} is not writable.")


def check_compatible(stored: TrainConfig, given: TrainConfig, what: str) -> None:
    differences = [
        d
        for d in config_differences(stored, given)
        if d.split(":")[0] not in TrainConfig.RESUMABLE_FIELDS
    ]
    if differences:
        raise ValueError(
            f"cannot resume {what} with a different configuration: " + "; ".join(differences)
        )


def check_header(path: str, header: dict[str, Any]) -> TrainConfig:
    """The `TrainConfig` of a training checkpoint's header, after checking the type and range
    of every field `train` and `load_run` read; a ValueError naming the file and field."""

    def bad(field: str, expected: str) -> ValueError:
        return ValueError(
            f"checkpoint {path!r}: header field {field!r} is {header.get(field)!r}; expected "
            f"{expected}. The file was not written by nfdm-de as it is."
        )

    stored = header.get("config")
    if not isinstance(stored, dict):
        raise bad("config", "a JSON object of settings")
    try:
        config = TrainConfig.from_dict(stored)
    except ValueError as error:
        raise ValueError(f"checkpoint {path!r}: its stored config is invalid: {error}") from None
    shape = header.get("data_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(map(_is_positive, shape))):
        raise bad("data_shape", "a list of 1 to 3 positive integers")
    if header.get("dtype") not in FLOAT_DTYPES:
        raise bad("dtype", " or ".join(repr(d) for d in FLOAT_DTYPES))
    levels = header.get("num_levels")
    if levels is not None and not (_is_positive(levels) and levels >= 2):
        raise bad("num_levels", "null or an integer >= 2")
    if not _is_iterator_state(header.get("data_iterator")):
        raise bad("data_iterator", 'an object {"next_index": integer >= 0}')
    source = header.get("source_iterator")
    if source is not None and not _is_iterator_state(source):
        raise bad("source_iterator", 'null or an object {"next_index": integer >= 0}')
    loss = header.get("loss")
    if not (isinstance(loss, int | float) and not isinstance(loss, bool)):
        raise bad("loss", "a number")
    if not isinstance(header.get("user_model", False), bool):
        raise bad("user_model", "true or false")
    return config


class UserModelRequired(ValueError):
    """A checkpoint of a user-built model, read without a model of its structure (`like`):
    nothing but the user's code can rebuild it."""


def _is_positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_iterator_state(state) -> bool:
    if not (isinstance(state, dict) and set(state) == {"next_index"}):
        return False
    index = state["next_index"]
    return isinstance(index, int) and not isinstance(index, bool) and index >= 0


def newest_readable(
    directory: str, load: Callable[[str], T]
) -> tuple[T | None, list[tuple[str, str]]]:
    """`load(path)` of the newest checkpoint in `directory` that loads without a ValueError, and
    the (path, reason) of each newer one that did not; (None, reasons) when none loads."""
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return load(path), skipped
        except UserModelRequired:  # every checkpoint of the run needs it: not a bad file
            raise
        except ValueError as error:
            skipped.append((path, " ".join(str(error).split())))
    return None, skipped


class RunDirectory:
    """The files of one training run. Only the main process writes (`main`)."""

    def __init__(self, path: str, *, main: bool = True):
        self.path = path
        self.main = main
        self.checkpoints = os.path.join(path, CHECKPOINT_DIR)
        self._metrics: list[str] = []
        self._config_on_disk: bytes | None = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, CONFIG_FILE)

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.path, METRICS_FILE)

    def open(self, config: TrainConfig, *, step: int) -> None:
        """Prepare to continue from `step` (0: a fresh run, whose config is written now): keep
        the metrics logged up to `step`, remove temporaries of killed writes. Nothing of an
        existing run is changed before the next successful `save`."""
        if not self.main:
            return
        os.makedirs(self.path, exist_ok=True)
        remove_stale_temporaries(self.path, [r"config\.json", r"metrics\.jsonl"])
        remove_stale_temporaries(self.checkpoints, [r"step_\d{8,}\.eqx"])
        self._metrics = _metrics_up_to(self.metrics_path, step)
        if os.path.isfile(self.config_path):
            with open(self.config_path, "rb") as f:
                self._config_on_disk = f.read()
        elif step == 0:
            self._write_config(config)

    def log(self, record: dict[str, Any]) -> None:
        """Queue one metrics row; it reaches `metrics.jsonl` with the next checkpoint."""
        self._metrics.append(json.dumps(record) + "\n")

    def save(self, step: int, state: Any, header: dict[str, Any], config: TrainConfig) -> str:
        """Write a checkpoint of `state`, then the config and metrics, then drop old
        checkpoints (keeping `config.keep`); returns the checkpoint's path."""
        if not self.main:
            return checkpoint_path(self.checkpoints, step)  # written by process 0
        path = save_checkpoint(self.checkpoints, step, state, header, keep=None)
        self._write_config(config)
        atomic_write_bytes(self.metrics_path, "".join(self._metrics).encode())
        for _, old in list_checkpoints(self.checkpoints)[: -config.keep]:
            try:
                os.unlink(old)
            except FileNotFoundError:
                pass
        return path

    def _write_config(self, config: TrainConfig) -> None:
        data = json.dumps(config.to_dict(), indent=2).encode()
        if data != self._config_on_disk:
            atomic_write_bytes(self.config_path, data)
            self._config_on_disk = data


def _metrics_up_to(path: str, step: int) -> list[str]:
    """The rows of `metrics.jsonl` up to `step` (later rows are of work lost after the
    checkpoint resumed from; a torn last line of a killed process is dropped)."""
    if not os.path.isfile(path):
        return []
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    return kept
