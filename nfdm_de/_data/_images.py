"""Image files as users keep them, read with numpy alone, and an image-grid writer.

Every reader returns `uint8` images of shape (N, H, W, C) (channel-last, like the models) and
raises `ValueError` with a one-line message naming the file and the problem on bad input. Formats:

- MNIST-style IDX (`train-images-idx3-ubyte`, optionally gzipped): a big-endian header
  `0x00 0x00 <dtype code> <ndim>` then `ndim` uint32 sizes, then the values.
- CIFAR-10 binary batches (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`): records
  of 1 label byte then 3072 bytes of a 32x32x3 image stored channel-first.
- Downsampled ImageNet `.npz` (`train_data_batch_1.npz`, `val_data.npz`): key `data` with one
  row of 3*S*S channel-first bytes per image (S = 32 or 64, inferred), optional `labels`.
- Plain `.npy` / `.npz` holding integer images of shape (N, H, W) or (N, H, W, C) with values in
  0..255.

All of these are 8-bit data: `num_levels = 256`. scikit-learn's digits (`load_digits_images`)
have 17 levels (values 0..16).
"""

import dataclasses
import gzip
import math
import os
import re
import zipfile
import zlib
from pathlib import Path
from typing import cast

import numpy as np
from jaxtyping import Integer, UInt8

from .._files import atomic_write, check_numpy_file

_CIFAR_SIDE = 32
_CIFAR_RECORD = 1 + 3 * _CIFAR_SIDE * _CIFAR_SIDE

# IDX dtype codes (third header byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Images ready for the data pipeline.

    - `images`: `uint8` array of shape (N, H, W, C).
    - `num_levels`: K, the number of intensity levels (values lie in 0..K-1).
    - `labels`: integer class labels of shape (N,), or None where the format has none.
    """

    images: UInt8[np.ndarray, "num height width channels"]
    num_levels: int
    labels: Integer[np.ndarray, " num"] | None = None

    def __post_init__(self):
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError(
                f"ImageData expects uint8 images of shape (N, H, W, C); got "
                f"{self.images.dtype} of shape {self.images.shape}."
            )
        if not 2 <= self.num_levels <= 256:
            raise ValueError(f"`num_levels` must be in 2..256; got {self.num_levels}.")
        if self.images.size and int(self.images.max()) >= self.num_levels:
            raise ValueError(
                f"Image values must lie in 0..{self.num_levels - 1}; found "
                f"{int(self.images.max())}."
            )
        if self.labels is not None and self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"Expected {self.images.shape[0]} labels; got an array of shape "
                f"{self.labels.shape}."
            )


def _fail(path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def as_uint8_images(
    array, source: str = "images"
) -> UInt8[np.ndarray, "num height width channels"]:
    """Validate an array of images and return it as `uint8` of shape (N, H, W, C).

    Accepts integer arrays of shape (N, H, W) (one channel added) or (N, H, W, C) with values in
    0..255. Rejects object arrays and ragged lists (images of mixed shapes), non-integer dtypes
    and out-of-range values; `source` names the input in the error message.
    """
    if isinstance(array, list | tuple):
        shapes = {np.shape(item) for item in array}
        if len(shapes) > 1:
            raise _fail(source, f"images of mixed shapes {sorted(shapes)[:4]}; expected one shape")
        array = np.stack(array) if array else np.zeros((0,), np.uint8)
    array = np.asarray(array)
    if array.dtype == object:
        raise _fail(
            source,
            "an object array (images of mixed shapes or Python objects); expected one integer "
            "array of shape (N, H, W) or (N, H, W, C)",
        )
    if not (np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_):
        raise _fail(
            source,
            f"images must have an integer dtype with values in 0..255; got dtype {array.dtype}",
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or 0 in array.shape:
        raise _fail(
            source,
            f"expected a non-empty array of shape (N, H, W) or (N, H, W, C); got {array.shape}",
        )
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise _fail(source, f"image values must lie in 0..255; found values in {low}..{high}")
    return np.ascontiguousarray(array, dtype=np.uint8)


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise _fail(path, f"cannot read file ({error.strerror or error})") from None
    if raw[:2] == b"\x1f\x8b":  # the gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise _fail(path, f"corrupt or truncated gzip data ({error})") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array of its declared shape/dtype."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise _fail(path, f"truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic")
    if raw[0] != 0 or raw[1] != 0:
        raise _fail(
            path,
            f"not an IDX file: magic number starts {raw[0]:#04x} {raw[1]:#04x}, expected 0x00 0x00",
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"{c:#04x}" for c in _IDX_DTYPES)
        raise _fail(path, f"unknown IDX dtype code {code:#04x} (expected one of {known})")
    if ndim == 0:
        raise _fail(path, "IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail(path, f"truncated IDX header: {ndim} dimensions need {header} bytes")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    actual = len(raw) - header
    if actual < expected:
        raise _fail(
            path,
            f"truncated IDX data: shape {dims} needs {expected} bytes, found {actual}",
        )
    if actual > expected:
        raise _fail(
            path,
            f"IDX data has {actual - expected} bytes beyond what shape {dims} declares",
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx_images(path: str | os.PathLike) -> UInt8[np.ndarray, "num height width channels"]:
    """Read MNIST-style IDX images (unsigned bytes, shape (N, H, W) or (N, H, W, C))."""
    array = read_idx(path)
    if array.dtype != np.uint8:
        raise _fail(path, f"IDX images must be unsigned bytes (code 0x08); got {array.dtype}")
    if array.ndim not in (3, 4):
        raise _fail(
            path,
            f"IDX images must have 3 or 4 dimensions (N, H, W[, C]); got shape {array.shape}",
        )
    return as_uint8_images(array, str(path))


def read_cifar10_batch(
    path: str | os.PathLike,
) -> tuple[UInt8[np.ndarray, "num 32 32 3"], UInt8[np.ndarray, " num"]]:
    """Read one CIFAR-10 binary batch: (images (N, 32, 32, 3), labels (N,))."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) == 0:
        raise _fail(path, "empty CIFAR-10 batch")
    if len(raw) % _CIFAR_RECORD:
        raise _fail(
            path,
            f"truncated CIFAR-10 batch: {len(raw)} bytes is not a whole number of "
            f"{_CIFAR_RECORD}-byte records",
        )
    records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].copy()
    if labels.max() > 9:
        raise _fail(path, f"CIFAR-10 label {int(labels.max())} is outside 0..9")
    images = records[:, 1:].reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _batch_number(path: Path) -> int:
    # Numeric order, so data_batch_10.bin would follow data_batch_9.bin.
    digits = re.findall(r"\d+", path.stem)
    return int(digits[-1]) if digits else 0


def read_cifar10(directory: str | os.PathLike, split: str = "train") -> ImageData:
    """Read the CIFAR-10 binary batches in `directory`: `data_batch_*.bin` (split "train") or
    `test_batch.bin` (split "test"), concatenated in batch order."""
    directory = Path(directory)
    if split == "train":
        files = sorted(directory.glob("data_batch_*.bin"), key=_batch_number)
    elif split == "test":
        files = sorted(directory.glob("test_batch.bin"))
    else:
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test'; got {split!r}.")
    if not files:
        pattern = "data_batch_*.bin" if split == "train" else "test_batch.bin"
        raise _fail(directory, f"no CIFAR-10 batches ({pattern}) in this directory")
    parts = [read_cifar10_batch(f) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageData(images, 256, labels)


def _load_npz_or_npy(path: Path):
    check_numpy_file(os.fspath(path), "image file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise _fail(
                path,
                "holds an object array (images of mixed shapes or Python objects); expected "
                "integer image arrays",
            ) from None
        raise _fail(path, f"not a valid numpy file ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise _fail(path, f"not a valid or complete numpy file ({error})") from None


def _npz_array(archive, path: Path, key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise _fail(
                path,
                f"key {key!r} holds an object array (images of mixed shapes or Python objects)",
            ) from None
        raise _fail(path, f"key {key!r} cannot be read ({error})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as error:
        raise _fail(path, f"key {key!r} is corrupt or truncated ({error})") from None


def _imagenet_rows(data: np.ndarray, path: Path) -> np.ndarray:
    """Rows of 3*S*S channel-first bytes -> (N, S, S, 3)."""
    row = data.shape[1]
    side = math.isqrt(row // 3)
    if row % 3 or side * side * 3 != row:
        raise _fail(
            path,
            f"`data` rows have {row} values; downsampled-ImageNet rows hold 3*S*S "
            "channel-first bytes (e.g. 3072 for 32x32, 12288 for 64x64)",
        )
    images = as_uint8_images(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1), str(path))
    return images


def read_npz_images(path: str | os.PathLike) -> ImageData:
    """Read images from an `.npz` archive.

    - Downsampled-ImageNet layout: key `data` of shape (N, 3*S*S), rows channel-first; optional
      `labels` (kept as stored, e.g. 1..1000).
    - Otherwise the image array is key `images`, or `data`, or the archive's only array, of shape
      (N, H, W) or (N, H, W, C); optional `labels`.
    """
    path = Path(path)
    archive = _load_npz_or_npy(path)
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _fail(path, "expected an .npz archive; this is a single .npy array")
    with archive:
        keys = list(archive.keys())
        for key in ("images", "data"):
            if key in keys:
                break
        else:
            if len(keys) != 1:
                raise _fail(
                    path,
                    f"cannot tell which array holds the images among keys {keys}; name it "
                    "'images' or 'data'",
                )
            key = keys[0]
        data = _npz_array(archive, path, key)
        if data.dtype == object:
            raise _fail(path, f"key {key!r} holds an object array (images of mixed shapes)")
        if key == "data" and data.ndim == 2:
            images = _imagenet_rows(data, path)
        else:
            images = as_uint8_images(data, f"{path} (key {key!r})")
        labels = None
        if "labels" in keys and key != "labels":
            labels = np.asarray(_npz_array(archive, path, "labels"))
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise _fail(
                    path, f"`labels` must be a 1-D integer array; got {labels.dtype} {labels.shape}"
                )
            if labels.shape[0] != images.shape[0]:
                raise _fail(
                    path,
                    f"{labels.shape[0]} labels for {images.shape[0]} images",
                )
    return ImageData(images, 256, labels)


def read_npy_images(path: str | os.PathLike) -> ImageData:
    """Read integer images of shape (N, H, W) or (N, H, W, C) from an `.npy` file."""
    path = Path(path)
    array = _load_npz_or_npy(path)
    if not isinstance(array, np.ndarray):
        raise _fail(path, "expected a single .npy array; this is an .npz archive")
    return ImageData(as_uint8_images(array, str(path)), 256)


def load_digits_images() -> ImageData:
    """scikit-learn's bundled 8x8 digits as (1797, 8, 8, 1) uint8 with 17 levels (0..16)."""
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    # Untyped in scikit-learn: a Bunch, or (X, y) with return_X_y=True.
    bunch = cast(Bunch, load_digits())
    images = bunch.images.astype(np.uint8)[..., None]
    return ImageData(images, 17, bunch.target.astype(np.int64))


def _is_idx_name(name: str) -> bool:
    name = name.lower()
    return name.endswith((".idx", "-ubyte", ".gz")) or re.search(r"\.idx\d", name) is not None


def read_images(path: str | os.PathLike, *, split: str = "train") -> ImageData:
    """Read images from `path`, choosing the reader by what the path is.

    - a directory of CIFAR-10 binary batches (`split` picks `data_batch_*.bin` or
      `test_batch.bin`), or a single `*.bin` batch;
    - an IDX file: name ending `.idx`, `-ubyte`, `.idxN-ubyte` or `.gz`;
    - an `.npz` archive (downsampled-ImageNet layout or plain images, see `read_npz_images`);
    - an `.npy` array of images.
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file or directory")
    if path.is_dir():
        return read_cifar10(path, split)
    name = path.name.lower()
    if name.endswith(".bin"):
        images, labels = read_cifar10_batch(path)
        return ImageData(images, 256, labels)
    if name.endswith(".npz"):
        return read_npz_images(path)
    if name.endswith(".npy"):
        return read_npy_images(path)
    if _is_idx_name(name):
        return ImageData(read_idx_images(path), 256)
    raise _fail(
        path,
        "unrecognised image file; expected a CIFAR-10 directory or .bin batch, an IDX file "
        "(.idx, -ubyte, .gz), an .npz or an .npy",
    )


def save_image_grid(
    images,
    path: str | os.PathLike,
    *,
    num_levels: int | None = None,
    columns: int | None = None,
    title: str | None = None,
    pixels_per_cell: int = 4,
) -> Path:
    """Write images of shape (N, H, W) or (N, H, W, C) with C in {1, 3} as a PNG grid.

    Integer images are scaled by `num_levels - 1` (default 255, i.e. 8-bit); float images are
    taken to be in [0, 1] and clipped. `columns` defaults to a near-square grid. The file is
    written to a temporary name and renamed, so an existing file is never left half-written.
    """
    # A bare Figure (no pyplot) renders with Agg and leaves the user's backend alone.
    from matplotlib.figure import Figure

    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.shape[0] == 0:
        raise ValueError(
            f"save_image_grid expects images of shape (N, H, W) or (N, H, W, C) with C in "
            f"{{1, 3}} and N >= 1; got {np.shape(images)}."
        )
    if np.issubdtype(array.dtype, np.integer):
        scale = 255 if num_levels is None else num_levels - 1
        array = array.astype(np.float64) / scale
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"save_image_grid expects integer or float images; got {array.dtype}.")
    array = np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0)

    n, h, w, c = array.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    gap = 1
    canvas = np.ones((rows * (h + gap) + gap, columns * (w + gap) + gap, c))
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = gap + r * (h + gap), gap + col * (w + gap)
        canvas[top : top + h, left : left + w] = array[i]

    dpi = 100
    height_px = max(canvas.shape[0] * pixels_per_cell, 64)
    width_px = max(canvas.shape[1] * pixels_per_cell, 64)
    fig = Figure(figsize=(width_px / dpi, height_px / dpi + (0.3 if title else 0)), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, height_px / (height_px + (30 if title else 0))))
    ax.imshow(
        canvas[..., 0] if c == 1 else canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest"
    )
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, os.fspath(path), dpi=dpi)
    return path


# Formats every matplotlib installation writes (the Agg and vector backends).
FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "eps", "ps", "tif", "tiff", "webp")


def figure_format(path: str) -> str:
    """The image format named by `path`'s extension (png when it has none), or a ValueError."""
    extension = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if not extension:
        return "png"
    if extension not in FIGURE_FORMATS:
        raise ValueError(
            f"cannot write a figure as {os.fspath(path)!r}: unknown image format {extension!r}; "
            f"use one of {', '.join('.' + f for f in FIGURE_FORMATS)}."
        )
    return extension


def save_figure(fig, path: str, *, dpi: int = 120) -> None:
    """Write the matplotlib figure `fig` atomically to exactly `path`, in the format its
    extension names (`figure_format`)."""
    fmt = figure_format(path)
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))
