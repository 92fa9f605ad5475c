"""The built-in data sets: 2-D densities and a 10-D mixture with exact log-densities, and the
8x8 digits."""

import abc
import functools
import math
from collections.abc import Callable
from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._custom_types import Key, Scalar
from ._images import ImageData, load_digits_images


class AbstractDataset(eqx.Module):
    """A built-in dataset: `sample(n, key=key) -> (n, dim)` and `log_prob(x)` on one example.

    `num_levels` is K for integer data in [0, K) (dequantised by the pipeline), else None.
    """

    name: eqx.AbstractClassVar[str]
    dim: eqx.AbstractClassVar[int]
    num_levels: eqx.AbstractClassVar[int | None]

    @abc.abstractmethod
    def sample(self, n: int, *, key: Key) -> Float[Array, "n dim"]:
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

    def sample(self, n, *, key):
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

    def sample(self, n, *, key):
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

    def sample(self, n, *, key):
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

    def sample(self, n, *, key):
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

    def sample(self, n, *, key):
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


class _RotatedShapes(AbstractDataset):
    """The product of D/2 independent 2-D shapes (checkerboard, two-moons, spirals, rings, in
    turn), each centred and scaled to unit standard deviation per axis, under a fixed random
    rotation R of R^D:

        x = R y,   y = (y_1, ..., y_{D/2}),   log p(x) = sum_k log p_k(R^T x restricted to pair k)

    (|det R| = 1). Every coordinate of x mixes all the shapes, so no coordinate pair carries
    one shape alone: a known density in D dimensions that is far from a Gaussian mixture.
    """

    num_levels = None

    def _factors(self) -> tuple[AbstractDataset, ...]:
        names = ("checkerboard", "two-moons", "spirals", "rings")
        return tuple(get_dataset(names[k % len(names)]) for k in range(self.dim // 2))

    def _rotation(self, dtype) -> Array:
        rng = np.random.default_rng(self.dim)  # fixed: part of the dataset's definition
        q, r = np.linalg.qr(rng.normal(size=(self.dim, self.dim)))
        return jnp.asarray(q * np.sign(np.diag(r)), dtype)

    def sample(self, n, *, key):
        dtype = jnp.result_type(float)
        moments = jnp.asarray(_cached_moments(type(self)), dtype)
        keys = jr.split(key, self.dim // 2)
        pairs = [
            (factor.sample(n, key=k) - moments[i, 0]) / moments[i, 1]
            for i, (factor, k) in enumerate(zip(self._factors(), keys, strict=True))
        ]
        return jnp.concatenate(pairs, axis=1) @ self._rotation(dtype).T

    def log_prob(self, x):
        moments = jnp.asarray(_cached_moments(type(self)), x.dtype)
        y = (self._rotation(x.dtype).T @ x).reshape(-1, 2)
        total = jnp.zeros((), x.dtype)
        for i, factor in enumerate(self._factors()):
            point = y[i] * moments[i, 1] + moments[i, 0]
            log_prob = factor.log_prob(point)
            assert log_prob is not None
            total = total + log_prob + jnp.sum(jnp.log(moments[i, 1]))
        return total


@functools.cache
def _shape_moments(name: str) -> np.ndarray:
    """A 2-D set's per-axis (mean, standard deviation), estimated once from 200,000 draws with a
    fixed key: constants that are part of the rotated products' definition."""
    with jax.ensure_compile_time_eval():  # also when first needed under a trace
        points = np.asarray(get_dataset(name).sample(200_000, key=jr.key(7)), np.float64)
    return np.stack([points.mean(0), points.std(0)])


@functools.cache
def _cached_moments(cls: type[_RotatedShapes]) -> np.ndarray:
    """(pairs, 2 [mean, std], 2): each pair's per-axis mean and standard deviation."""
    dataset = get_dataset(cls.name)
    assert isinstance(dataset, _RotatedShapes)
    return np.asarray([_shape_moments(factor.name) for factor in dataset._factors()])


class Shapes8D(_RotatedShapes):
    name = "shapes-8d"
    dim = 8


class Shapes16D(_RotatedShapes):
    name = "shapes-16d"
    dim = 16


class Shapes32D(_RotatedShapes):
    name = "shapes-32d"
    dim = 32


class Digits(AbstractDataset):
    """scikit-learn's bundled 8x8 digits as vectors of 64 integers in [0, 17) (no download).

    `sample` draws rows of the training split with replacement; the density is unknown.
    """

    name = "digits"
    dim = 64
    num_levels = 17

    def sample(self, n, *, key):
        rows = _digits_split("train")
        index = np.asarray(jr.randint(key, (n,), 0, rows.shape[0]))
        return jnp.asarray(rows[index], jnp.result_type(float))


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The `digits` set's fixed 80/20 split: (images as float64 64-vectors with integer values
    in [0, 17), their classes 0-9 as int32). Save them as a `.npz` with `x` and `labels` to
    train a class-conditional model."""
    from sklearn.datasets import load_digits
    from sklearn.utils import Bunch

    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test'; got {split!r}.")
    # Untyped in scikit-learn: a Bunch, or (X, y) with return_X_y=True.
    bunch = cast(Bunch, load_digits())
    x, labels = bunch.data.astype(np.float64), bunch.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(x.shape[0])
    num_test = x.shape[0] // 5
    rows = order[num_test:] if split == "train" else order[:num_test]
    return x[rows], labels[rows]


def _digits_split(split: str) -> np.ndarray:
    return digits_split(split)[0]


# The ignore: pyright takes `eqx.AbstractClassVar` attributes for __init__ arguments.
DATASETS: dict[str, Callable[[], AbstractDataset]] = {  # pyright: ignore[reportAssignmentType]
    cls.name: cls
    for cls in (
        EightGaussians,
        Checkerboard,
        TwoMoons,
        Spirals,
        Rings,
        GaussianMixture10D,
        Shapes8D,
        Shapes16D,
        Shapes32D,
        Digits,
    )
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


@functools.lru_cache(maxsize=16)
def _compiled_sampler(n: int):
    # One compiled call is much cheaper than dispatching the sampler's ops one by one; cached so
    # that repeated loads (evaluation, resumed runs) do not recompile.
    return eqx.filter_jit(lambda dataset, key: dataset.sample(n, key=key))


def _digits_images(split: str) -> ImageData:
    data = load_digits_images()
    order = np.random.default_rng(0).permutation(data.images.shape[0])  # as `_digits_split`
    num_test = data.images.shape[0] // 5
    rows = order[num_test:] if split == "train" else order[:num_test]
    labels = None if data.labels is None else data.labels[rows]
    return ImageData(data.images[rows], data.num_levels, labels)


IMAGE_DATASETS: dict[str, Callable[[str], ImageData]] = {"digits-images": _digits_images}
