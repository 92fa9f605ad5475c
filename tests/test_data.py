"""Datasets (true densities against grid integrals and samples), file loading, transform, pipeline.

Monte Carlo checks use k = 5 standard errors.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from helpers import IDENTITY_TOL

import nfdm_de as nd
from nfdm_de._data._densities import _cached_moments
from nfdm_de._data._loading import check_data_array

K_SIGMA = 5.0
TWO_D = ["eight-gaussians", "checkerboard", "two-moons", "spirals", "rings"]
HALF_WIDTH = 3.5  # every 2-D set has negligible mass outside [-3.5, 3.5]^2
GRID = 280  # cell 0.025: well below the smallest noise scale (0.08)


def _grid():
    edges = np.linspace(-HALF_WIDTH, HALF_WIDTH, GRID + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    xx, yy = np.meshgrid(centres, centres, indexing="ij")
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], axis=-1))
    return points, (edges[1] - edges[0]) ** 2


def _sample(dataset, key, n):
    return eqx.filter_jit(lambda d, k: d.sample(n, key=k))(dataset, key)


@pytest.fixture(scope="module")
def grid_log_probs():
    points, area = _grid()
    out = {}
    for name in TWO_D:
        dataset = nd.get_dataset(name)
        log_p = jax.jit(jax.vmap(dataset.log_prob))(points)
        out[name] = np.asarray(log_p).reshape(GRID, GRID), area
    return out


@pytest.mark.parametrize("name", TWO_D)
def test_density_integrates_to_one(name, grid_log_probs):
    log_p, area = grid_log_probs[name]
    mass = float(np.sum(np.exp(log_p)) * area)
    # Midpoint rule with cells of 0.025 on densities with features >= 0.08: error well below 1e-3.
    assert abs(mass - 1.0) < 2e-3, mass


@pytest.mark.parametrize("name", TWO_D)
def test_samples_match_density(name, grid_log_probs, getkey):
    """Mean log p over samples equals -entropy from the grid, and samples fall in coarse cells
    with the probabilities the density integrates to there."""
    dataset = nd.get_dataset(name)
    n = 4000
    x = _sample(dataset, getkey(), n)
    assert x.shape == (n, 2)
    log_p_samples = np.asarray(jax.jit(jax.vmap(dataset.log_prob))(x))
    assert np.all(np.isfinite(log_p_samples))
    log_p, area = grid_log_probs[name]
    p = np.exp(log_p)
    entropy = -float(np.sum(p * np.where(p > 0, log_p, 0.0)) * area)
    stderr = log_p_samples.std() / math.sqrt(n)
    assert abs(log_p_samples.mean() + entropy) < K_SIGMA * stderr + 5e-3

    # Coarse 7x7 cells: each cell's sample count against its probability mass.
    coarse = GRID // 7  # 280 = 7 * 40
    cell_mass = p.reshape(7, coarse, 7, coarse).sum(axis=(1, 3)) * area
    counts, _, _ = np.histogram2d(
        np.asarray(x[:, 0]), np.asarray(x[:, 1]), bins=7, range=[[-HALF_WIDTH, HALF_WIDTH]] * 2
    )
    expected = n * cell_mass
    tolerance = K_SIGMA * np.sqrt(expected * (1 - cell_mass)) + 2.0
    assert np.all(np.abs(counts - expected) < tolerance)


@pytest.mark.parametrize("cls", [nd.TwoMoons, nd.Spirals])
def test_curve_quadrature_converged(cls, getkey):
    """The quadrature density agrees with one on 4x more panels."""
    dataset = cls()
    x = _sample(dataset, getkey(), 64)

    class Finer(cls):
        num_panels = 4 * cls.num_panels

    fine = jax.jit(jax.vmap(Finer().log_prob))(x)
    coarse = jax.jit(jax.vmap(dataset.log_prob))(x)
    assert float(jnp.max(jnp.abs(fine - coarse))) < 1e-8


def test_gmm_10d_density_and_samples(getkey):
    from scipy.stats import multivariate_normal

    dataset = nd.get_dataset("gmm-10d")
    assert dataset.dim >= 8
    means, stds, weights = (np.asarray(a) for a in dataset._parameters(jnp.float64))
    x = _sample(dataset, getkey(), 20_000)
    # Density: against scipy's independent Gaussian densities.
    points = np.asarray(x[:50])
    oracle = np.log(
        sum(
            w * multivariate_normal(m, np.diag(s**2)).pdf(points)
            for m, s, w in zip(means, stds, weights, strict=True)
        )
    )
    ours = np.asarray(jax.vmap(dataset.log_prob)(jnp.asarray(points)))
    np.testing.assert_allclose(ours, oracle, rtol=1e-10, atol=1e-10)
    # Samples: mean against the mixture mean, within k standard errors per coordinate.
    mixture_mean = weights @ means
    sample = np.asarray(x)
    stderr = sample.std(axis=0) / math.sqrt(sample.shape[0])
    assert np.all(np.abs(sample.mean(axis=0) - mixture_mean) < K_SIGMA * stderr)


@pytest.mark.parametrize("name", ["shapes-8d"])  # 16-D and 32-D: the same code, more pairs
def test_rotated_shapes_density_and_samples(name, getkey):
    """The D-D product of standardised 2-D shapes under a rotation: its rotation is orthogonal,
    its log-density is the sum of the 2-D sets' own densities at the unrotated, unstandardised
    pairs (plus the standardisation's log-scales), and its samples have zero mean, and unit
    variance and independent pairs once unrotated."""
    dataset = nd.get_dataset(name)
    rotation = np.asarray(dataset._rotation(jnp.float64))
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(dataset.dim), atol=1e-12)
    x = np.asarray(_sample(dataset, getkey(), 20_000))
    assert x.shape == (20_000, dataset.dim)
    stderr = x.std(axis=0) / math.sqrt(x.shape[0])
    assert np.all(np.abs(x.mean(axis=0)) < K_SIGMA * stderr)
    # Unrotated: unit variance per coordinate and uncorrelated pairs (independent shapes).
    cov = np.cov((x @ rotation).T)
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.05)
    between = ~np.kron(np.eye(dataset.dim // 2, dtype=bool), np.ones((2, 2), dtype=bool))
    assert np.max(np.abs(cov[between])) < 0.04
    shapes = ["checkerboard", "two-moons", "spirals", "rings"]
    moments = _cached_moments(type(dataset))  # (pairs, [mean, std], 2)
    pairs = (x[:20] @ rotation).reshape(20, -1, 2)
    expected = np.zeros(20)
    for k in range(dataset.dim // 2):
        shape = nd.get_dataset(shapes[k % 4])
        mean, std = moments[k]
        points = jnp.asarray(pairs[:, k] * std + mean)
        expected += np.asarray(jax.vmap(shape.log_prob)(points)) + np.log(std).sum()
    ours = np.asarray(jax.vmap(dataset.log_prob)(jnp.asarray(x[:20])))
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
    assert np.all(np.isfinite(ours))


def test_every_dataset_has_true_density_except_digits():
    for name, cls in nd.DATASETS.items():
        assert cls().has_log_prob == (name != "digits"), name


def test_load_dataset_splits_are_held_out_and_deterministic():
    a = nd.load_dataset("rings", split="train", num=100, seed=0)
    b = nd.load_dataset("rings", split="train", num=100, seed=0)
    c = nd.load_dataset("rings", split="test", num=100, seed=0)
    assert a.shape == (100, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    assert not np.any(np.all(np.isclose(a[:, None, :], c[None, :, :]), axis=-1))
    assert nd.load_dataset("rings", split="test").shape == (10_000, 2)


def test_digits():
    train = nd.load_dataset("digits", split="train")
    test = nd.load_dataset("digits", split="test")
    assert train.shape[1] == 64 and train.shape[0] + test.shape[0] == 1797
    assert train.min() == 0 and train.max() == 16
    assert np.all(train == np.round(train))
    assert nd.dataset_num_levels("digits") == 17
    assert nd.load_dataset("digits", split="test", num=10).shape == (10, 64)


def test_dequantise(getkey):
    x = jnp.asarray(nd.load_dataset("digits", num=200))
    y = nd.dequantise(x, 17, key=getkey())
    assert float(y.min()) >= 0 and float(y.max()) < 1
    np.testing.assert_array_equal(np.floor(np.asarray(y) * 17), np.asarray(x))


def test_load_files(tmp_path):
    data = np.random.default_rng(0).normal(size=(30, 3))
    np.save(tmp_path / "a.npy", data)
    np.savez(tmp_path / "b.npz", x=data)
    np.savez(tmp_path / "c.npz", data.astype(np.float32))
    np.testing.assert_array_equal(nd.load_dataset(str(tmp_path / "a.npy")), data)
    np.testing.assert_array_equal(nd.load_dataset(str(tmp_path / "b.npz"), num=5), data[:5])
    assert nd.load_dataset(str(tmp_path / "c.npz")).dtype == np.float64


def _bad_files(tmp_path):
    np.save(tmp_path / "rank1.npy", np.zeros(5))
    np.save(tmp_path / "rank3.npy", np.zeros((2, 3, 4)))
    bad = np.zeros((4, 2))
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    bad[2, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = [1.0, 2.0], [3.0]
    np.save(tmp_path / "ragged.npy", ragged, allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"not an array at all")
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    return {
        "missing.npy": "does not exist",
        "rank1.npy": "rank 2",
        "rank3.npy": "rank 2",
        "nan.npy": "NaN/inf",
        "inf.npy": "NaN/inf",
        "ragged.npy": "cannot read",
        "garbage.npy": "is not a NumPy file",
        "strings.npy": "numeric",
    }


def test_bad_files(tmp_path):
    for name, message in _bad_files(tmp_path).items():
        with pytest.raises(ValueError, match=message):
            nd.load_dataset(str(tmp_path / name))
    with pytest.raises(ValueError, match="unknown dataset"):
        nd.load_dataset("no-such-set")
    with pytest.raises(ValueError, match="split"):
        nd.load_dataset("rings", split="valid")
    with pytest.raises(ValueError, match="empty"):
        check_data_array(np.zeros((0, 3)), "x")


def test_affine_transform(getkey):
    x = np.asarray(jr.normal(getkey(), (500, 3))) * np.array([1.0, 5.0, 0.1]) + 7.0
    transform = nd.AffineDataTransform.standardise(x)
    z = transform.to_model(jnp.asarray(x))
    np.testing.assert_allclose(np.mean(z, axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.std(z, axis=0), 1.0, atol=1e-10)
    back = transform.from_model(z)
    assert float(jnp.max(jnp.abs(back - x))) < 1e-12 * 100
    # log|det| against the autodiff Jacobian of to_model on one example.
    jacobian = jax.jacfwd(transform.to_model)(jnp.asarray(x[0]))
    _, logdet = jnp.linalg.slogdet(jacobian)
    assert abs(float(logdet - transform.log_det())) < IDENTITY_TOL
    assert abs(float(transform.log_det(jnp.asarray(x[0])) - transform.log_det())) == 0
    # A column constant in the training data is only shifted: a held-out 7.5 there maps to 0.5.
    constant = np.concatenate([x, np.full((500, 1), 7.0)], axis=1)
    transform = nd.AffineDataTransform.standardise(constant)
    assert float(transform.scale[3]) == 1.0
    held_out = jnp.asarray(np.append(x[0], 7.5))
    assert float(transform.to_model(held_out)[3]) == pytest.approx(0.5, abs=1e-12)


def test_pipeline_order(getkey):
    data = np.arange(40.0).reshape(20, 2)
    batches = nd.batch_dataset(data, batch_size=5, seed=3)
    epoch = np.concatenate([batches[i][:, 0] for i in range(4)])
    np.testing.assert_array_equal(np.sort(epoch), data[:, 0])  # one epoch = a permutation
    second = np.concatenate([batches[i][:, 0] for i in range(4, 8)])
    assert not np.array_equal(epoch, second)  # reshuffled each epoch
    other = nd.batch_dataset(data, batch_size=5, seed=4)
    assert not np.array_equal(batches[0], other[0])
    # The iterator's state restores the order exactly.
    iterator = iter(batches.to_iter_dataset())
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    restored = iter(batches.to_iter_dataset())
    restored.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(restored), e)


def test_true_nll_only_for_built_in_known_densities():
    x = nd.load_dataset("two-moons", split="test", num=5)
    expected = [-float(nd.get_dataset("two-moons").log_prob(jnp.asarray(p))) for p in x]
    np.testing.assert_allclose(nd.true_nll("two-moons", x), expected, rtol=1e-10)
    assert nd.true_nll("digits", np.zeros((2, 64))) is None
    assert nd.true_nll("some/file.npy", np.zeros((2, 2))) is None


@pytest.mark.parametrize(
    "size, batch_size, rows", [(20, 5, None), (23, 7, None), (3, 8, None), (30, 8, slice(2, 6))]
)
def test_batch_stream_is_grains_iterator_exactly(size, batch_size, rows):
    """`BatchStream` (what `train` reads) yields grain's batches over several epochs (also a
    batch longer than the data, and one process's rows), with interchangeable states."""
    data = np.arange(2.0 * size).reshape(size, 2)
    grain_iter = iter(
        nd.batch_dataset(data, batch_size=batch_size, seed=11, rows=rows).to_iter_dataset()
    )
    stream = nd.BatchStream(data, batch_size=batch_size, seed=11, rows=rows)
    for _ in range(4 * size // batch_size + 3):
        np.testing.assert_array_equal(next(stream), next(grain_iter))
    assert stream.get_state() == grain_iter.get_state()
    resumed = nd.BatchStream(data, batch_size=batch_size, seed=11, rows=rows)
    resumed.set_state(grain_iter.get_state())
    np.testing.assert_array_equal(next(resumed), next(grain_iter))


def test_batch_stream_falls_back_to_grain_when_its_shuffle_is_not_importable(monkeypatch):
    import nfdm_de._data._stream as data_module

    data = np.arange(46.0).reshape(23, 2)
    direct = nd.BatchStream(data, batch_size=7, seed=2)
    fast = [next(direct) for _ in range(9)]
    monkeypatch.setattr(data_module, "_grain_index_shuffle", None)
    stream = nd.BatchStream(data, batch_size=7, seed=2)
    for want in fast:
        np.testing.assert_array_equal(next(stream), want)
