"""`load_dataset`: a built-in set's split, or the user's .npy/.npz and image files, checked."""

import os

import jax.random as jr
import numpy as np

from .._files import check_numpy_file
from ._densities import (
    DATASETS,
    IMAGE_DATASETS,
    Digits,
    _compiled_sampler,
    _digits_split,
    get_dataset,
)

_SPLIT_STREAM = {"train": 0, "test": 1}


# The member of a data `.npz` holding one integer class label per row.
LABELS_KEY = "labels"


def is_file_reference(name_or_path: str) -> bool:
    """True if `name_or_path` names a file (or a CIFAR-10 directory) rather than a built-in
    dataset."""
    if name_or_path in DATASETS or name_or_path in IMAGE_DATASETS:
        return False
    return (
        name_or_path.endswith((".npy", ".npz", ".bin", ".gz", ".idx", "-ubyte"))
        or os.sep in name_or_path
        or os.path.isdir(name_or_path)
    )


# Built-in image datasets: name -> split -> ImageData. Kept apart from `DATASETS` (whose members
# are vector sets with `sample`/`log_prob`).
def is_dataset_name(name: str) -> bool:
    """True for a built-in dataset name (vector or image)."""
    return name in DATASETS or name in IMAGE_DATASETS


def _npz_holds_images(path: str) -> bool:
    """An `.npz` is read as images when it has an `images` array, or a `data` array that is
    `uint8` of rank 2 (the downsampled-ImageNet layout, rows of channel-first bytes), or its data
    array is an integer array of rank 3 or 4; otherwise it holds vectors (N, D)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if "images" in names:
                return True
            if not names:
                return False
            names = [n for n in names if n != LABELS_KEY] or names
            key = "x" if "x" in names else ("data" if "data" in names else names[0])
            array = archive[key]
    except Exception:  # unreadable: let the vector loader report it
        return False
    if key == "data" and array.dtype == np.uint8 and array.ndim == 2:
        return True
    return array.dtype.kind in "iu" and array.ndim in (3, 4)


def _npy_holds_images(path: str) -> bool:
    # Only the header (nothing is unpickled or read): integer arrays of rank 3 or 4 are images.
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception:  # not a valid .npy: let the vector loader report it
        return False
    return dtype.kind in "iu" and len(shape) in (3, 4)


def is_image_source(name_or_path: str) -> bool:
    """Whether `name_or_path` holds images (read as (N, H, W, C)) rather than vectors (N, D):
    a built-in image set, a CIFAR-10 directory or `.bin` batch, an IDX file, an integer `.npy`
    of rank 3 or 4, or an image `.npz` (see `_npz_holds_images`)."""
    if name_or_path in IMAGE_DATASETS:
        return True
    if not is_file_reference(name_or_path):
        return False
    from ._images import _is_idx_name

    base = os.path.basename(name_or_path.rstrip(os.sep)).lower()
    if os.path.isdir(name_or_path) or base.endswith(".bin") or _is_idx_name(base):
        return True
    if not os.path.isfile(name_or_path):
        return False
    if base.endswith(".npy"):
        return _npy_holds_images(name_or_path)
    if base.endswith(".npz"):
        return _npz_holds_images(name_or_path)
    return False


def load_images(name_or_path: str, *, split: str = "train"):
    """The `ImageData` (uint8 (N, H, W, C), `num_levels`) of a built-in image set or an image
    file. `split` picks the built-in set's held-out split or a CIFAR-10 directory's test batch;
    a single file is used as it is for either split (pass a separate test file)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"`split` must be 'train' or 'test'; got {split!r}.")
    if name_or_path in IMAGE_DATASETS:
        return IMAGE_DATASETS[name_or_path](split)
    from ._images import read_images

    return read_images(name_or_path, split=split)


def _unreadable(what: str, error: Exception) -> ValueError:
    """The message for a NumPy read that failed: an object array (which needs pickle, never
    allowed here) or a damaged file."""
    if "allow_pickle" in str(error):
        return ValueError(
            f"cannot read {what}: it holds an object array (ragged rows or images of mixed "
            "shapes); expected one numeric array of a single shape."
        )
    return ValueError(f"cannot read {what}: {error}")


def _load_array_file(path: str) -> np.ndarray:
    if not path.endswith((".npy", ".npz")):
        raise ValueError(f"data file {path!r} must be a .npy or .npz file.")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist.")
    check_numpy_file(path, "data file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, BadZipFile, EOFError, ...
        raise _unreadable(f"data file {path!r}", error) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    with loaded:
        names = list(loaded.files)
        if not names:
            raise ValueError(f"data file {path!r} holds no arrays.")
        names = [n for n in names if n != LABELS_KEY] or names
        key = "x" if "x" in names else ("data" if "data" in names else names[0])
        if len(names) > 1 and key == names[0] and key not in ("x", "data"):
            raise ValueError(
                f"data file {path!r} holds several arrays {names}; name the data array 'x'."
            )
        try:
            return loaded[key]
        except Exception as error:  # a damaged member: zlib/zipfile/ValueError
            raise _unreadable(f"array {key!r} of {path!r}", error) from None


def load_labels(name_or_path: str, num: int | None = None) -> np.ndarray | None:
    """The class labels of a data file: the `labels` member of a vector `.npz`, one integer >= 0
    per row of its data, as int32 (the first `num` when given, as `load_dataset` takes the
    first `num` rows); None when it has none."""
    if not (name_or_path.endswith(".npz") and os.path.isfile(name_or_path)):
        return None
    if is_image_source(name_or_path):
        return None
    where = f"the labels of {name_or_path!r}"
    try:
        with np.load(name_or_path, allow_pickle=False) as loaded:
            if LABELS_KEY not in loaded.files:
                return None
            labels = loaded[LABELS_KEY]
    except Exception as error:
        raise _unreadable(where, error) from None
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise ValueError(f"{where}: expected one number per row; got shape {labels.shape}.")
    rows = _load_array_file(name_or_path).shape[0]
    if labels.shape[0] != rows:
        raise ValueError(f"{where}: {labels.shape[0]} labels for {rows} rows of data.")
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)) or labels.min() < 0:
        raise ValueError(f"{where}: class labels must be integers >= 0.")
    if labels.max() >= 2**31:
        raise ValueError(f"{where}: a class label of {int(labels.max())} is too large.")
    labels = labels.astype(np.int32)
    return labels if num is None else labels[:num]


def check_data_array(array, where: str) -> np.ndarray:
    """A finite float array of shape (N, D) with N >= 1, or a ValueError saying what is wrong."""
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise ValueError(
            f"{where}: expected a numeric array of shape (N, D); got dtype {array.dtype} "
            "(a ragged or non-numeric array)."
        )
    if array.ndim != 2:
        raise ValueError(
            f"{where}: expected an array of shape (N, D) (rank 2); got shape {array.shape}."
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{where}: the array is empty (shape {array.shape}).")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(
            f"{where}: the data contain {int(bad.sum())} NaN/inf value(s) (first in row {row})."
        )
    return array


def load_dataset(
    name_or_path: str, *, split: str = "train", num: int | None = None, seed: int = 0
) -> np.ndarray:
    """Data in the data's own units, as a float64 numpy array of shape (N, D) (vectors) or
    (N, H, W, C) (images, integer values in [0, K)).

    - built-in toy sets: `num` fresh samples (default 50,000 for train and 10,000 for test),
      drawn from `seed`; the test split uses a different random stream than the train split, so
      it is held out.
    - `digits`: the fixed 80/20 train/test split of the 1,797 images, integers in [0, 17), as
      64-vectors; `digits-images`: the same split as (8, 8, 1) images.
    - a `.npy`/`.npz` file of shape (N, D) (`split` is ignored: pass a separate test file);
    - image files (`is_image_source`): IDX (raw or gzip), CIFAR-10 batches (a directory: `split`
      picks the training batches or `test_batch.bin`), downsampled-ImageNet `.npz`, `uint8`
      `.npy`/`.npz` of rank 3 or 4.

    `num`, when given for a finite set, takes the first `num` rows.
    """
    if split not in _SPLIT_STREAM:
        raise ValueError(f"`split` must be 'train' or 'test'; got {split!r}.")
    if num is not None and not (isinstance(num, int) and num > 0):
        raise ValueError(f"`num` must be a positive integer or None; got {num!r}.")
    if is_image_source(name_or_path):
        array = load_images(name_or_path, split=split).images.astype(np.float64)
    elif is_file_reference(name_or_path):
        array = check_data_array(_load_array_file(name_or_path), f"data file {name_or_path!r}")
    elif name_or_path == Digits.name:
        array = _digits_split(split)
    else:
        dataset = get_dataset(name_or_path)
        n = num or (50_000 if split == "train" else 10_000)
        key = jr.fold_in(jr.key(seed), _SPLIT_STREAM[split])
        return np.asarray(_compiled_sampler(n)(dataset, key), dtype=np.float64)
    return array if num is None else array[:num]


def dataset_num_levels(name_or_path: str) -> int | None:
    """K for integer data in [0, K) that is dequantised in training (digits: 17, image files:
    256), else None."""
    if name_or_path in IMAGE_DATASETS:
        return IMAGE_DATASETS[name_or_path]("train").num_levels
    if is_image_source(name_or_path):
        return 256  # every image file format holds bytes
    if is_file_reference(name_or_path):
        return None
    return get_dataset(name_or_path).num_levels
