"""Data: built-in datasets with true densities, file loading, standardisation, the grain pipeline.

Every built-in dataset is a typed object with `name`, `dim`, `sample(key, n)` and `log_prob(x)`
(on one example; `None` where the density is unknown). The 2-D toy sets and the 10-D mixture have
exact (or accurate-quadrature) log-densities, used as the truth in NLL benchmarks.

Model space: the networks see standardised data `z = to_model(x)`. The `AffineDataTransform`
is computed on the *training* data only and stored in the run, so samples and NLLs can be mapped
back to the data's own units: `nll_data = nll_model - transform.log_det()`.
"""

import abc
import functools
import math
import os
from collections.abc import Callable
from typing import cast

import equinox as eqx
import grain
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Key, Scalar
from ._files import check_numpy_file
from ._image_io import ImageData, load_digits_images

try:  # The permutation grain's `shuffle` applies, one index at a time (a C++ function).
    from grain._src.python.experimental.index_shuffle.python import (
        index_shuffle_module as _grain_index_shuffle,
    )
except ImportError:  # another grain layout: `BatchStream` reads batches through grain instead
    _grain_index_shuffle = None

# --- the data transform -------------------------------------------------------------------------


class AffineDataTransform(eqx.Module):
    """z = to_model(x) = (x - shift) / scale, elementwise; `log_det` is log|det d z / d x|.

    `shift` and `scale` have the shape of one example: `(D,)` for vectors, `(H, W, C)` for
    images. Works on one example and, by broadcasting, on a batch `(N, *shape)`.
    """

    shift: Float[Array, " *shape"]
    scale: Float[Array, " *shape"]

    def __check_init__(self):
        if self.shift.shape != self.scale.shape or self.shift.ndim < 1:
            raise ValueError(
                f"AffineDataTransform needs shift and scale of one example's shape ((D,) or "
                f"(H, W, C)); got {self.shift.shape} and {self.scale.shape}."
            )

    @classmethod
    def identity(cls, shape: int | tuple[int, ...], dtype=None) -> "AffineDataTransform":
        dtype = dtype or jnp.result_type(float)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return cls(jnp.zeros(shape, dtype), jnp.ones(shape, dtype))

    @classmethod
    def standardise(cls, x, *, min_scale: float = 1e-6) -> "AffineDataTransform":
        """Per-dimension mean and standard deviation of the training data `x` of shape (N, D)."""
        x = np.asarray(x, dtype=np.float64)
        shift = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), min_scale)
        dtype = jnp.result_type(float)
        return cls(jnp.asarray(shift, dtype), jnp.asarray(scale, dtype))

    def to_model(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        return (x - self.shift) / self.scale

    def from_model(self, z: Float[Array, "..."]) -> Float[Array, "..."]:
        return z * self.scale + self.shift

    def log_det(self, x=None) -> Scalar:
        """log|det d to_model / dx| per example (constant for an affine map; `x` is ignored)."""
        del x
        return -jnp.sum(jnp.log(self.scale))


# --- built-in datasets --------------------------------------------------------------------------


class AbstractDataset(eqx.Module):
    """A built-in dataset: `sample(key, n) -> (n, dim)` and `log_prob(x)` on one example.

    `num_levels` is K for integer data in [0, K) (dequantised by the pipeline), else None.
    """

    name: eqx.AbstractClassVar[str]
    dim: eqx.AbstractClassVar[int]
    num_levels: eqx.AbstractClassVar[int | None]

    @abc.abstractmethod
    def sample(self, key: Key, n: int) -> Float[Array, "n dim"]:
        """n independent draws."""

    def log_prob(self, x: Float[Array, " dim"]) -> Scalar | None:
        """The true log-density at one point, or None when unknown."""
        return None

    @property
    def has_log_prob(self) -> bool:
        return type(self).log_prob is not AbstractDataset.log_prob


def _log_normal(x, mean, std):
    """log N(x; mean, std^2 I) summed over the last axis (broadcasting)."""
    d = x.shape[-1]
    return (
        -0.5 * jnp.sum(((x - mean) / std) ** 2, axis=-1)
        - d * jnp.log(std)
        - 0.5 * d * math.log(2 * math.pi)
    )


class EightGaussians(AbstractDataset):
    """Equal mixture of 8 isotropic Gaussians (std 0.2) centred on a circle of radius 2."""

    name = "eight-gaussians"
    dim = 2
    num_levels = None
    radius: float = 2.0
    std: float = 0.2

    def _centres(self, dtype):
        angles = jnp.arange(8, dtype=dtype) * (2 * math.pi / 8)
        return self.radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)

    def sample(self, key, n):
        dtype = jnp.result_type(float)
        k1, k2 = jr.split(key)
        which = jr.randint(k1, (n,), 0, 8)
        return self._centres(dtype)[which] + self.std * jr.normal(k2, (n, 2), dtype)

    def log_prob(self, x):
        logs = _log_normal(x[None, :], self._centres(x.dtype), self.std)
        return jax.nn.logsumexp(logs) - math.log(8)


class Checkerboard(AbstractDataset):
    """Uniform on the 8 unit squares of [-2, 2]^2 where floor(x) + floor(y) is even: density
    1/8 there and 0 elsewhere (sharp edges; log_prob = -inf off the board)."""

    name = "checkerboard"
    dim = 2
    num_levels = None

    def sample(self, key, n):
        dtype = jnp.result_type(float)
        k1, k2 = jr.split(key)
        cell = jr.randint(k1, (n,), 0, 8)
        row = cell // 2  # 4 rows, 2 black cells each
        col = 2 * (cell % 2) + (row % 2)  # floor(x) + floor(y) even after the -2 shift
        corner = jnp.stack([col, row], axis=-1).astype(dtype) - 2
        return corner + jr.uniform(k2, (n, 2), dtype)

    def log_prob(self, x):
        inside = jnp.all((x >= -2) & (x < 2))
        black = (jnp.sum(jnp.floor(x)).astype(jnp.int32) % 2) == 0
        return jnp.where(inside & black, -math.log(8.0), -jnp.inf).astype(x.dtype)


class _CurveMixture(AbstractDataset):
    """Points uniform in the parameter u of one of several curves c_k(u), u in [0, 1], plus
    isotropic Gaussian noise:

        p(x) = 1/K sum_k int_0^1 N(x; c_k(u), std^2 I) du

    The integral is computed by Gauss-Legendre quadrature on `num_panels` panels of 8 nodes; the
    nodes are far closer than `std` in arc length, so the error is negligible (checked in tests).
    """

    num_levels = None

    @abc.abstractmethod
    def _curves(self, u: Array) -> Array:
        """(K, *u.shape, 2): every curve at parameters u."""

    std: eqx.AbstractClassVar[float]
    num_panels: eqx.AbstractClassVar[int]

    def sample(self, key, n):
        dtype = jnp.result_type(float)
        k1, k2, k3 = jr.split(key, 3)
        u = jr.uniform(k1, (n,), dtype)
        curves = self._curves(u)  # (K, n, 2)
        which = jr.randint(k2, (n,), 0, curves.shape[0])
        points = curves[which, jnp.arange(n)]
        return points + self.std * jr.normal(k3, (n, 2), dtype)

    def log_prob(self, x):
        nodes, weights = np.polynomial.legendre.leggauss(8)
        edges = np.linspace(0.0, 1.0, self.num_panels + 1)
        half = 0.5 * (edges[1:] - edges[:-1])
        u = ((edges[:-1] + half)[:, None] + half[:, None] * nodes[None, :]).reshape(-1)
        w = (half[:, None] * weights[None, :]).reshape(-1)
        u, log_w = jnp.asarray(u, x.dtype), jnp.log(jnp.asarray(w, x.dtype))
        centres = self._curves(u)  # (K, Q, 2)
        logs = _log_normal(x, centres, self.std) + log_w
        return jax.nn.logsumexp(logs) - math.log(centres.shape[0])


class TwoMoons(_CurveMixture):
    """Two interleaved half circles (radius 1) with uniform angle, plus N(0, 0.1^2 I) noise."""

    name = "two-moons"
    dim = 2
    std = 0.1
    num_panels = 16

    def _curves(self, u):
        theta = math.pi * u
        upper = jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
        lower = jnp.stack([1 - jnp.cos(theta), 0.5 - jnp.sin(theta)], axis=-1)
        # Centre the pair at the origin.
        offset = jnp.asarray([0.5, 0.25], u.dtype)
        return jnp.stack([upper - offset, lower - offset])


class Spirals(_CurveMixture):
    """Two interleaved Archimedean spirals r = 0.25 + 2.25 u, angle 3 pi u (+ pi for the second
    arm), uniform in u, plus N(0, 0.1^2 I) noise."""

    name = "spirals"
    dim = 2
    std = 0.1
    num_panels = 96

    def _curves(self, u):
        r = 0.25 + 2.25 * u
        angle = 3 * math.pi * u
        arm = r[..., None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
        return jnp.stack([arm, -arm])


class Rings(AbstractDataset):
    """Concentric rings: uniform angle, radius r ~ N(r_k, std^2) with ring k chosen with
    probability proportional to r_k.

    With x = r (cos a, sin a) and r allowed to be negative, the map (r, a) -> x is two-to-one, so

        p(x) = [p_r(|x|) + p_r(-|x|)] / (2 pi |x|),   p_r = sum_k w_k N(r; r_k, std^2).
    """

    name = "rings"
    dim = 2
    num_levels = None
    radii: tuple[float, ...] = (0.75, 1.5, 2.25)
    std: float = 0.08

    def _weights(self, dtype):
        r = jnp.asarray(self.radii, dtype)
        return r / jnp.sum(r)

    def sample(self, key, n):
        dtype = jnp.result_type(float)
        k1, k2, k3 = jr.split(key, 3)
        which = jr.choice(k1, len(self.radii), (n,), p=self._weights(dtype))
        r = jnp.asarray(self.radii, dtype)[which] + self.std * jr.normal(k2, (n,), dtype)
        a = jr.uniform(k3, (n,), dtype, 0, 2 * math.pi)
        return r[:, None] * jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)

    def log_prob(self, x):
        rho = jnp.sqrt(jnp.sum(x**2))
        radii = jnp.asarray(self.radii, x.dtype)
        log_w = jnp.log(self._weights(x.dtype))
        r = jnp.stack([rho, -rho])[:, None]
        logs = (
            log_w
            - 0.5 * ((r - radii) / self.std) ** 2
            - math.log(self.std)
            - 0.5 * math.log(2 * math.pi)
        )
        return jax.nn.logsumexp(logs) - jnp.log(2 * math.pi * rho)


class GaussianMixture10D(AbstractDataset):
    """A 10-D mixture of 4 Gaussians with diagonal covariances: well separated means at distance
    ~4 from the origin along fixed random directions, standard deviations in [0.5, 1]."""

    name = "gmm-10d"
    dim = 10
    num_levels = None

    def _parameters(self, dtype):
        rng = np.random.default_rng(1234)  # fixed: part of the dataset's definition
        directions = rng.normal(size=(4, self.dim))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        means = 4.0 * directions
        stds = rng.uniform(0.5, 1.0, size=(4, self.dim))
        weights = np.array([0.4, 0.3, 0.2, 0.1])
        return (jnp.asarray(a, dtype) for a in (means, stds, weights))

    def sample(self, key, n):
        dtype = jnp.result_type(float)
        means, stds, weights = self._parameters(dtype)
        k1, k2 = jr.split(key)
        which = jr.choice(k1, 4, (n,), p=weights)
        return means[which] + stds[which] * jr.normal(k2, (n, self.dim), dtype)

    def log_prob(self, x):
        means, stds, weights = self._parameters(x.dtype)
        logs = (
            -0.5 * jnp.sum(((x - means) / stds) ** 2, axis=-1)
            - jnp.sum(jnp.log(stds), axis=-1)
            - 0.5 * self.dim * math.log(2 * math.pi)
        )
        return jax.nn.logsumexp(logs + jnp.log(weights))


class Digits(AbstractDataset):
    """scikit-learn's bundled 8x8 digits as vectors of 64 integers in [0, 17) (no download).

    `sample` draws rows of the training split with replacement; the density is unknown.
    """

    name = "digits"
    dim = 64
    num_levels = 17

    def sample(self, key, n):
        rows = _digits_split("train")
        index = np.asarray(jr.randint(key, (n,), 0, rows.shape[0]))
        return jnp.asarray(rows[index], jnp.result_type(float))


def _digits_split(split: str) -> np.ndarray:
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    # Untyped in scikit-learn: a Bunch, or (X, y) with return_X_y=True.
    x = cast(Bunch, load_digits()).data.astype(np.float64)
    order = np.random.default_rng(0).permutation(x.shape[0])
    num_test = x.shape[0] // 5
    return x[order[num_test:]] if split == "train" else x[order[:num_test]]


# The ignore: pyright takes `eqx.AbstractClassVar` attributes for __init__ arguments.
DATASETS: dict[str, Callable[[], AbstractDataset]] = {  # pyright: ignore[reportAssignmentType]
    cls.name: cls
    for cls in (EightGaussians, Checkerboard, TwoMoons, Spirals, Rings, GaussianMixture10D, Digits)
}


def get_dataset(name: str) -> AbstractDataset:
    """The built-in dataset called `name` (see `DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; expected a data file or one of: "
            f"{', '.join([*DATASETS, *IMAGE_DATASETS])}."
        )
    return DATASETS[name]()


def true_nll(name: str, x: Float[ArrayLike, " n *shape"]) -> np.ndarray | None:
    """-log p(x) per example under the built-in dataset `name`'s true density, in nats; None for
    a file or a dataset without a known density. Used to report an NLL's gap to the truth."""
    if name not in DATASETS:
        return None
    dataset = DATASETS[name]()
    if not dataset.has_log_prob:
        return None
    x = jnp.asarray(x, jnp.result_type(float))
    return -np.asarray(jax.jit(jax.vmap(dataset.log_prob))(x), np.float64)


# --- loading ------------------------------------------------------------------------------------

_SPLIT_STREAM = {"train": 0, "test": 1}


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
def _digits_images(split: str) -> ImageData:
    data = load_digits_images()
    order = np.random.default_rng(0).permutation(data.images.shape[0])  # as `_digits_split`
    num_test = data.images.shape[0] // 5
    rows = order[num_test:] if split == "train" else order[:num_test]
    labels = None if data.labels is None else data.labels[rows]
    return ImageData(data.images[rows], data.num_levels, labels)


IMAGE_DATASETS: dict[str, Callable[[str], ImageData]] = {"digits-images": _digits_images}


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
    from ._image_io import _is_idx_name

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
    from ._image_io import read_images

    return read_images(name_or_path, split=split)


def _load_array_file(path: str) -> np.ndarray:
    if not path.endswith((".npy", ".npz")):
        raise ValueError(f"data file {path!r} must be a .npy or .npz file.")
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist.")
    check_numpy_file(path, "data file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises ValueError, OSError, BadZipFile, EOFError, ...
        if "allow_pickle" in str(error):
            raise ValueError(
                f"cannot read data file {path!r}: it holds an object array (ragged rows or "
                "images of mixed shapes); expected one numeric array of a single shape."
            ) from None
        raise ValueError(f"cannot read data file {path!r}: {error}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            names = list(loaded.files)
            if not names:
                raise ValueError(f"data file {path!r} holds no arrays.")
            key = "x" if "x" in names else ("data" if "data" in names else names[0])
            if len(names) > 1 and key == names[0] and key not in ("x", "data"):
                raise ValueError(
                    f"data file {path!r} holds several arrays {names}; name the data array 'x'."
                )
            try:
                array = loaded[key]
            except Exception as error:  # a damaged member: zlib/zipfile/ValueError
                if "allow_pickle" in str(error):
                    raise ValueError(
                        f"cannot read array {key!r} of {path!r}: an object array (ragged rows "
                        "or images of mixed shapes); expected one numeric array of one shape."
                    ) from None
                raise ValueError(f"cannot read array {key!r} of {path!r}: {error}") from None
    else:
        array = loaded
    return array


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


@functools.lru_cache(maxsize=16)
def _compiled_sampler(n: int):
    # One compiled call is much cheaper than dispatching the sampler's ops one by one; cached so
    # that repeated loads (evaluation, resumed runs) do not recompile.
    return eqx.filter_jit(lambda dataset, key: dataset.sample(key, n))


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


def fit_transform(name_or_path: str, train: np.ndarray) -> AffineDataTransform:
    """The map into model space, computed on the training data only.

    Continuous data are standardised per dimension. Integer data in [0, K) (digits, images) are
    first dequantised to y = (x + u) / K in [0, 1) by the pipeline; the transform then maps y
    with one scalar scale and shift for all dimensions (docs/math.md, "Bits/dim": s = a y + b),
    fitted to the dequantised training data (mean of (x + 1/2) / K, its standard deviation), and
    stored with the shape of one example.
    """
    levels = dataset_num_levels(name_or_path)
    if levels is None:
        return AffineDataTransform.standardise(train)
    y = (train + 0.5) / levels
    dtype = jnp.result_type(float)
    shape = train.shape[1:]
    shift = jnp.full(shape, y.mean(), dtype)
    scale = jnp.full(shape, max(float(y.std()), 1e-6), dtype)
    return AffineDataTransform(shift, scale)


# --- the grain pipeline -------------------------------------------------------------------------


class _Gather:
    """grain map: a batch of row indices -> the rows (one numpy gather per batch)."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __call__(self, index: np.ndarray) -> np.ndarray:
        return self.array[index]


class _Rows:
    """grain map: a global batch of row indices -> this process's part of it."""

    def __init__(self, rows: slice):
        self.rows = rows

    def __call__(self, index: np.ndarray) -> np.ndarray:
        return index[self.rows]


def batch_dataset(
    array: np.ndarray, *, batch_size: int, seed: int, rows: slice | None = None
) -> grain.MapDataset:
    """Infinite, seeded, reshuffled-every-epoch batches of rows of `array`.

    `MapDataset` is random access: batch `i` is a pure function of (array, seed, i), so the
    iterator state is the index of the next batch, and a resumed run sees the same data order.
    `rows` keeps only that slice of every global batch (one process's share in a multi-process
    run; only those rows are gathered).
    """
    if array.ndim < 2:
        raise ValueError(
            f"expected a training array of shape (N, D) or (N, H, W, C); got {array.shape}."
        )
    indices = grain.MapDataset.range(array.shape[0]).shuffle(seed=seed).repeat()
    batches = indices.batch(batch_size)
    if rows is not None:
        batches = batches.map(_Rows(rows))
    return batches.map(_Gather(array))


class BatchStream:
    """The batches of `batch_dataset(array, batch_size=, seed=, rows=)` in order, with the
    iterator protocol and state (`{"next_index": i}`) of `iter(dataset.to_iter_dataset())`.

    grain's pipeline walks every example of a batch through its Python layers (shuffle, repeat,
    batch), which on a small CPU costs more per batch than a default train step, and its
    prefetch thread competes with the training loop for the cores. Here
    batch i's row indices are computed directly with the permutation grain's `shuffle` uses
    (per epoch e, seed + e), so the batches, and a run trained on them, are identical; a test
    checks that against grain's own iterator.
    """

    def __init__(self, array: np.ndarray, *, batch_size: int, seed: int, rows: slice | None = None):
        self._array = array
        self._batch_size = batch_size
        self._seed = seed
        self._rows = rows
        self._next_index = 0

    def _indices(self, batch: int) -> np.ndarray:
        if _grain_index_shuffle is None:
            raise ValueError("grain's index_shuffle is unavailable: read batches through grain.")
        size = self._array.shape[0]
        indices = np.empty(self._batch_size, np.int64)
        for k, position in enumerate(
            range(batch * self._batch_size, (batch + 1) * self._batch_size)
        ):
            epoch, within = divmod(position, size)
            indices[k] = _grain_index_shuffle.index_shuffle(
                within, max_index=size - 1, seed=(self._seed + epoch) % 2**32, rounds=4
            )
        return indices if self._rows is None else indices[self._rows]

    def batch(self, index: int) -> np.ndarray:
        """Batch `index` (random access)."""
        if _grain_index_shuffle is None:
            batch = self._fallback_dataset()[index]
            if batch is None:  # grain's type for a filtered-out element; these batches have none
                raise ValueError(f"grain returned no batch {index}.")
            return batch
        return self._array[self._indices(index)]

    def _fallback_dataset(self):
        # Built once, on first use, and only when grain's shuffle module could not be imported.
        if getattr(self, "_dataset", None) is None:
            self._dataset = batch_dataset(
                self._array, batch_size=self._batch_size, seed=self._seed, rows=self._rows
            )
        return self._dataset

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> np.ndarray:
        out = self.batch(self._next_index)
        self._next_index += 1
        return out

    def get_state(self) -> dict:
        return {"next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        self._next_index = int(state["next_index"])


def dequantise(key: Key, x: Float[Array, " *shape"], num_levels: int) -> Float[Array, " *shape"]:
    """y = (x + u) / K with u ~ U[0, 1)^D: integers in [0, K) to a density on [0, 1)^D."""
    return (x + jr.uniform(key, x.shape, x.dtype)) / num_levels
