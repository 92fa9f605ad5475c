"""Sample-quality metrics against reference data: energy distance and MMD, batched in JAX.

Both are two-sample statistics on flattened examples; pairwise terms are summed in row blocks so
memory stays at `block_size * num_other` distances however large the samples are. Within-sample
terms exclude the diagonal (U-statistics), so both estimates are unbiased and hover around zero
(either sign) when the two samples come from one distribution.
"""

from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from ._custom_types import Scalar

_DEFAULT_BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _flatten(a: ArrayLike, name: str) -> Array:
    a = jnp.asarray(a)
    if a.ndim < 2 or a.shape[0] < 2:
        raise ValueError(f"`{name}` must be a batch of at least 2 examples; got shape {a.shape}.")
    return a.reshape(a.shape[0], -1)


def _pair_sum(
    a: Array, b: Array, fn: Callable[[Array], Array], same: bool, block_size: int
) -> Array:
    """sum_{i, j} fn(|a_i - b_j|^2), excluding i = j when `same`."""
    n = a.shape[0]
    pad = (-n) % block_size
    a_pad = jnp.concatenate([a, jnp.zeros((pad, a.shape[1]), a.dtype)])
    rows = jnp.arange(n + pad)
    b_sq = jnp.sum(b**2, axis=1)
    cols = jnp.arange(b.shape[0])

    def block(args):
        a_block, index = args
        sq = jnp.sum(a_block**2, axis=1)[:, None] + b_sq[None, :] - 2 * a_block @ b.T
        sq = jnp.maximum(sq, 0.0)
        keep = (index < n)[:, None]
        if same:
            keep = keep & (index[:, None] != cols[None, :])
        return jnp.sum(jnp.where(keep, fn(sq), 0.0))

    blocks = (a_pad.reshape(-1, block_size, a.shape[1]), rows.reshape(-1, block_size))
    return jnp.sum(jax.lax.map(block, blocks))


def _safe_sqrt(sq: Array) -> Array:
    return jnp.sqrt(jnp.where(sq > 0, sq, 0.0))


@eqx.filter_jit
def _energy(x, y, block_size):
    n, m = x.shape[0], y.shape[0]
    cross = _pair_sum(x, y, _safe_sqrt, False, block_size) / (n * m)
    within_x = _pair_sum(x, x, _safe_sqrt, True, block_size) / (n * (n - 1))
    within_y = _pair_sum(y, y, _safe_sqrt, True, block_size) / (m * (m - 1))
    return 2 * cross - within_x - within_y


def energy_distance(
    x: Float[ArrayLike, " n *shape"],
    y: Float[ArrayLike, " m *other_shape"],
    *,
    block_size: int = 256,
) -> Scalar:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Euclidean norms, unbiased)."""
    x, y = _flatten(x, "x"), _flatten(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same example size; got {x.shape} and {y.shape}.")
    return _energy(x, y, min(block_size, x.shape[0], y.shape[0]))


def _rbf_sum(bandwidths: Array) -> Callable[[Array], Array]:
    def kernel(sq):
        return jnp.sum(jnp.exp(-sq[..., None] / (2 * bandwidths**2)), axis=-1)

    return kernel


@eqx.filter_jit
def _mmd(x, y, bandwidths, block_size):
    n, m = x.shape[0], y.shape[0]
    kernel = _rbf_sum(bandwidths)
    cross = _pair_sum(x, y, kernel, False, block_size) / (n * m)
    within_x = _pair_sum(x, x, kernel, True, block_size) / (n * (n - 1))
    within_y = _pair_sum(y, y, kernel, True, block_size) / (m * (m - 1))
    return within_x + within_y - 2 * cross


def median_distance(
    x: Float[ArrayLike, " n *shape"], y: Float[ArrayLike, " m *other_shape"]
) -> Scalar:
    """Median pairwise distance of the pooled samples (first 1,000 of each): the median
    heuristic that scales the default MMD bandwidths to the data."""
    pooled = jnp.concatenate([_flatten(x, "x")[:1000], _flatten(y, "y")[:1000]])
    sq = jnp.sum((pooled[:, None, :] - pooled[None, :, :]) ** 2, axis=-1)
    upper = jnp.triu_indices(pooled.shape[0], k=1)
    return jnp.median(jnp.sqrt(sq[upper]))


def mmd(
    x: Float[ArrayLike, " n *shape"],
    y: Float[ArrayLike, " m *other_shape"],
    *,
    bandwidths: Sequence[float] | None = None,
    block_size: int = 256,
) -> Scalar:
    """Squared maximum mean discrepancy (unbiased) with a sum of RBF kernels,

        k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)),

    over `bandwidths` h; by default the median pairwise distance times 0.25, 0.5, 1, 2 and 4.
    """
    x, y = _flatten(x, "x"), _flatten(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same example size; got {x.shape} and {y.shape}.")
    if bandwidths is None:
        scale = median_distance(x, y)
        h = scale * jnp.asarray(_DEFAULT_BANDWIDTH_FACTORS, x.dtype)
    else:
        if len(bandwidths) == 0 or any(not b > 0 for b in bandwidths):
            raise ValueError(f"`bandwidths` must be positive numbers; got {bandwidths!r}.")
        h = jnp.asarray(bandwidths, x.dtype)
    return _mmd(x, y, h, min(block_size, x.shape[0], y.shape[0]))
