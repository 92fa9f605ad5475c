"""Data <-> model space: the affine standardisation of a run, and dequantisation of integer data."""

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float

from .._custom_types import Key, Scalar
from ._loading import dataset_num_levels


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
        """Per-dimension mean and standard deviation of the training data `x` of shape (N, D).

        A column constant in the training data (standard deviation below `min_scale`) is only
        shifted (scale 1): a held-out value off that constant stays at its distance in data
        units instead of landing millions of units out, where no ODE solve could follow it."""
        x = np.asarray(x, dtype=np.float64)
        shift = x.mean(axis=0)
        std = x.std(axis=0)
        scale = np.where(std < min_scale, 1.0, std)
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


def dequantise(x: Float[Array, " *shape"], num_levels: int, *, key: Key) -> Float[Array, " *shape"]:
    """y = (x + u) / K with u ~ U[0, 1)^D: integers in [0, K) to a density on [0, 1)^D."""
    return (x + jr.uniform(key, x.shape, x.dtype)) / num_levels
