"""Crash-safe checkpoints: a JSON header line, then `eqx.tree_serialise_leaves`. Never pickle.

File layout (`step_00001000.eqx`):

    {"format": "nfdm-de-checkpoint", "format_version": 1, "library_version": ..., "step": ...,
     "payload_bytes": N, "payload_sha256": ..., ...caller's fields...}\\n
    <N bytes: the leaves of the saved pytree, in tree order>

Writes are atomic (`_files.atomic_write`), so a reader (or a process resumed after SIGKILL) sees
either the previous set of checkpoints or the new complete one, never a half-written file. Only
the last `keep` checkpoints are kept. Loading rebuilds the pytree into a skeleton (typically from
`eqx.filter_eval_shape`) and checks every leaf's shape and dtype.
"""

import hashlib
import io
import json
import os
import re
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._files import atomic_write_bytes

FORMAT = "nfdm-de-checkpoint"
FORMAT_VERSION = 3
_NAME = re.compile(r"^step_(\d{8,})\.eqx$")


def _library_version() -> str:
    from . import __version__

    return __version__


def checkpoint_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:08d}.eqx")


def list_checkpoints(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in `directory`, oldest first: regular files named
    `step_XXXXXXXX.eqx` (temporary files of interrupted writes, links and directories are
    ignored, so retention never deletes anything else)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for entry in os.scandir(directory):
        match = _NAME.match(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            found.append((int(match.group(1)), entry.path))
    return sorted(found)


def latest_checkpoint(directory: str) -> str | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    directory: str, step: int, tree: Any, header: dict[str, Any], *, keep: int | None = 3
) -> str:
    """Atomically write `tree` (arrays and Python scalars as leaves) with a JSON `header` as
    `step_XXXXXXXX.eqx` in `directory`, then delete all but the newest `keep` checkpoints
    (None: delete none)."""
    if keep is not None and keep < 1:
        raise ValueError(f"`keep` must be >= 1; got {keep}.")
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, tree)
    payload = buffer.getvalue()
    full_header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": _library_version(),
        "step": int(step),
        **header,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(full_header, sort_keys=True).encode() + b"\n"
    path = checkpoint_path(directory, step)
    atomic_write_bytes(path, head + payload)
    for _, old in list_checkpoints(directory)[:-keep] if keep is not None else []:
        try:
            os.unlink(old)
        except FileNotFoundError:
            pass
    return path


def read_header(path: str) -> dict[str, Any]:
    """The JSON header of a checkpoint, checked for format and library version."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as error:
        raise ValueError(f"cannot read checkpoint {path!r}: {error}") from None
    try:
        header = json.loads(line)
    except ValueError:
        raise ValueError(f"{path!r} is not an nfdm-de checkpoint (no JSON header).") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not an nfdm-de checkpoint.")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        older = isinstance(version, int) and version < FORMAT_VERSION
        raise ValueError(
            f"checkpoint {path!r} has format version {version!r}"
            + (", written by an older nfdm-de" if older else "")
            + f"; this nfdm-de ({_library_version()}) reads format version {FORMAT_VERSION}"
            + (": retrain the run." if older else ".")
        )
    written, ours = str(header.get("library_version")), _library_version()
    if _major_minor(written) != _major_minor(ours):
        raise ValueError(
            f"checkpoint {path!r} was written by nfdm-de {written}, which is incompatible with "
            f"the installed nfdm-de {ours} (major.minor versions differ)."
        )
    _check_core_fields(path, header)
    return header


def _check_core_fields(path: str, header: dict[str, Any]) -> None:
    step, size, digest = (
        header.get("step"),
        header.get("payload_bytes"),
        header.get("payload_sha256"),
    )
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise ValueError(
            f"checkpoint {path!r}: header field 'step' is {step!r}, not an integer >= 0."
        )
    match = _NAME.match(os.path.basename(path))
    if match and int(match.group(1)) != step:
        raise ValueError(
            f"checkpoint {path!r}: its header says step {step}, its file name step "
            f"{int(match.group(1))}."
        )
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise ValueError(f"checkpoint {path!r}: header field 'payload_bytes' is {size!r}.")
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"checkpoint {path!r}: header field 'payload_sha256' is {digest!r}.")


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def load_checkpoint(path: str, like: Any) -> tuple[dict[str, Any], Any]:
    """(header, tree) from `path`, loading the leaves into the skeleton `like` (arrays or
    `jax.ShapeDtypeStruct`s). Checks the payload's checksum and every leaf's shape and dtype."""
    header = read_header(path)
    with open(path, "rb") as f:
        f.readline()
        payload = f.read()
    if len(payload) != header["payload_bytes"] or (
        hashlib.sha256(payload).hexdigest() != header["payload_sha256"]
    ):
        raise ValueError(f"checkpoint {path!r} is corrupt (its payload checksum does not match).")
    buffer = io.BytesIO(payload)
    try:
        # NumPy placeholders make equinox read NumPy arrays: `jnp.load` would silently narrow
        # float64 to float32 in a float32 process, and the dtype check below must see the disk.
        tree = eqx.tree_deserialise_leaves(buffer, jax.tree.map(_numpy_placeholder, like))
    except Exception as error:  # a structure mismatch surfaces as a numpy read error
        raise ValueError(
            f"checkpoint {path!r} does not match the expected structure: {error}"
        ) from None
    if buffer.tell() != len(payload):
        raise ValueError(
            f"checkpoint {path!r} holds more leaves than the expected structure (was it written "
            "by a different model configuration?)."
        )
    _check_leaves(path, like, tree)
    return header, jax.tree.map(_to_jax, tree)


def _numpy_placeholder(leaf):
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
        return np.empty(leaf.shape, leaf.dtype)
    return leaf


def _to_jax(leaf):
    if not isinstance(leaf, np.ndarray):
        return leaf
    if np.issubdtype(leaf.dtype, np.floating):
        # A float64 checkpoint in a float32 process: narrow explicitly (callers cast further).
        return jnp.asarray(
            leaf.astype(jnp.result_type(float) if leaf.dtype == np.float64 else leaf.dtype)
        )
    return jnp.asarray(leaf)


def _check_leaves(path: str, like: Any, tree: Any) -> None:
    def check(keypath, expected, got):
        if isinstance(expected, jax.ShapeDtypeStruct | jax.Array | np.ndarray):
            if expected.shape != got.shape or expected.dtype != got.dtype:
                raise ValueError(
                    f"checkpoint {path!r}: leaf {jtu.keystr(keypath)} has shape {got.shape} and "
                    f"dtype {got.dtype}; expected {expected.shape} and {expected.dtype}."
                )

    jtu.tree_map_with_path(check, like, tree)
