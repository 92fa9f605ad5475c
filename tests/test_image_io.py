"""Image readers against files the tests write, their rejections of bad input, digits, and the
grid writer."""

import gzip
import struct

import numpy as np
import pytest

import nfdm_de as nd


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    # Written independently of the reader: the IDX header by hand, big-endian values.
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize(
    "name, compress",
    [
        ("train-images-idx3-ubyte", False),
        ("train-images-idx3-ubyte.gz", True),
        ("images.idx", False),
        ("gz-content-without-gz-name-ubyte", True),  # gzip is detected by its magic bytes
    ],
)
def test_idx_images_round_trip(tmp_path, rng, name, compress):
    images = rng.integers(0, 256, (5, 7, 6), dtype=np.uint8)
    raw = _idx_bytes(images, 0x08)
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if compress else raw)
    data = nd.read_images(path)
    assert data.images.dtype == np.uint8 and data.images.shape == (5, 7, 6, 1)
    np.testing.assert_array_equal(data.images[..., 0], images)
    assert data.num_levels == 256 and data.labels is None


@pytest.mark.parametrize(
    "dtype, code", [(np.uint8, 0x08), (np.int8, 0x09), (np.int16, 0x0B), (np.int32, 0x0C)]
)
def test_idx_generic_dtypes_are_big_endian(tmp_path, rng, dtype, code):
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, (11,), dtype=dtype)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(_idx_bytes(values, code))
    np.testing.assert_array_equal(nd.read_idx(path), values)


def test_idx_float_dtypes(tmp_path, rng):
    values = rng.normal(size=(3, 4))
    path = tmp_path / "x.idx"
    path.write_bytes(_idx_bytes(values, 0x0E))
    np.testing.assert_array_equal(nd.read_idx(path), values)
    path.write_bytes(_idx_bytes(values.astype(np.float32), 0x0D))
    np.testing.assert_array_equal(nd.read_idx(path), values.astype(np.float32))


def _idx_cases(rng):
    good = _idx_bytes(rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), 0x08)
    return {
        "truncated IDX data": good[:-3],
        "truncated IDX header": good[:9],
        "shorter than the 4-byte magic": good[:3],
        "not an IDX file": b"\x01\x02" + good[2:],
        "unknown IDX dtype code": good[:2] + b"\x07" + good[3:],
        "beyond what shape": good + b"\x00\x00",
        "must be unsigned bytes": _idx_bytes(rng.integers(0, 9, (4, 5, 5)).astype(">i4"), 0x0C),
        "3 or 4 dimensions": _idx_bytes(rng.integers(0, 9, (7,), dtype=np.uint8), 0x08),
    }


@pytest.mark.parametrize("problem", list(_idx_cases(np.random.default_rng(0))))
def test_bad_idx_files_raise(tmp_path, problem):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(_idx_cases(np.random.default_rng(0))[problem])
    with pytest.raises(ValueError, match=problem) as info:
        nd.read_images(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_gzip_raises(tmp_path, rng):
    raw = gzip.compress(_idx_bytes(rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), 0x08))
    path = tmp_path / "images-idx3-ubyte.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated gzip") as info:
        nd.read_images(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary batches


def _write_cifar_batch(path, images_hwc, labels):
    # 1 label byte then the image channel-first (all red, then green, then blue).
    records = [
        bytes([int(label)]) + np.transpose(image, (2, 0, 1)).tobytes()
        for image, label in zip(images_hwc, labels, strict=True)
    ]
    path.write_bytes(b"".join(records))


def test_cifar10_batches_round_trip(tmp_path, rng):
    batches = {}
    for name, n in (("data_batch_1.bin", 3), ("data_batch_2.bin", 2), ("data_batch_10.bin", 1)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        _write_cifar_batch(tmp_path / name, images, labels)
        batches[name] = (images, labels)
    test_images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, (4,), dtype=np.uint8)
    _write_cifar_batch(tmp_path / "test_batch.bin", test_images, test_labels)
    (tmp_path / "batches.meta.txt").write_text("airplane\n")  # as in the real directory

    train = nd.read_images(tmp_path)
    order = ["data_batch_1.bin", "data_batch_2.bin", "data_batch_10.bin"]  # numeric order
    np.testing.assert_array_equal(train.images, np.concatenate([batches[k][0] for k in order]))
    np.testing.assert_array_equal(train.labels, np.concatenate([batches[k][1] for k in order]))
    assert train.num_levels == 256

    test = nd.read_images(tmp_path, split="test")
    np.testing.assert_array_equal(test.images, test_images)
    np.testing.assert_array_equal(test.labels, test_labels)

    single = nd.read_images(tmp_path / "data_batch_2.bin")
    np.testing.assert_array_equal(single.images, batches["data_batch_2.bin"][0])


def test_cifar10_channel_order(tmp_path):
    # A red image must come back red in channel-last order.
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[..., 0] = 255
    _write_cifar_batch(tmp_path / "data_batch_1.bin", image, [3])
    images, labels = nd.read_cifar10_batch(tmp_path / "data_batch_1.bin")
    assert images[0, 5, 7].tolist() == [255, 0, 0] and labels.tolist() == [3]


def test_bad_cifar10_raises(tmp_path, rng):
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "data_batch_1.bin"
    _write_cifar_batch(path, images, [1, 2])
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated CIFAR-10 batch") as info:
        nd.read_images(tmp_path)
    assert str(path) in str(info.value)
    _write_cifar_batch(path, images, [1, 12])
    with pytest.raises(ValueError, match="label 12 is outside 0..9"):
        nd.read_images(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty CIFAR-10 batch"):
        nd.read_images(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no CIFAR-10 batches"):
        nd.read_images(empty)
    with pytest.raises(ValueError, match="split"):
        nd.read_cifar10(tmp_path, split="validation")


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet .npz


@pytest.mark.parametrize("side", [32, 64])
def test_imagenet_npz_round_trip(tmp_path, rng, side):
    images = rng.integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    rows = np.transpose(images, (0, 3, 1, 2)).reshape(3, -1)  # channel-first rows
    labels = np.array([1, 500, 1000])  # the files' 1-based class numbers, kept as stored
    path = tmp_path / "train_data_batch_1.npz"
    np.savez(path, data=rows, labels=labels, mean=rows.mean(0))
    data = nd.read_images(path)
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    # Without labels (e.g. a stripped file) the images still load.
    np.savez(path, data=rows)
    np.testing.assert_array_equal(nd.read_images(path).images, images)


def test_bad_imagenet_npz_raises(tmp_path, rng):
    path = tmp_path / "val_data.npz"
    np.savez(path, data=rng.integers(0, 256, (2, 3000), dtype=np.uint8))
    with pytest.raises(ValueError, match="rows have 3000 values"):
        nd.read_images(path)
    rows = rng.integers(0, 256, (2, 3 * 16 * 16), dtype=np.uint8)
    np.savez(path, data=rows, labels=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="3 labels for 2 images"):
        nd.read_images(path)
    np.savez(path, data=rows.astype(np.int32) + 200)
    with pytest.raises(ValueError, match="must lie in 0..255"):
        nd.read_images(path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="not a valid or complete numpy file"):
        nd.read_images(path)


# ---------------------------------------------------------------------------------------------
# Plain .npy / .npz images


@pytest.mark.parametrize("shape", [(4, 6, 5), (4, 6, 5, 3)])
@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_plain_arrays_round_trip(tmp_path, rng, shape, suffix):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"images{suffix}"
    if suffix == ".npy":
        np.save(path, images)
    else:
        np.savez(path, images=images, labels=np.arange(4))
    data = nd.read_images(path)
    expected = images if images.ndim == 4 else images[..., None]
    np.testing.assert_array_equal(data.images, expected)
    assert data.images.dtype == np.uint8


def test_wider_integer_dtypes_in_range_are_accepted(tmp_path):
    images = np.arange(2 * 4 * 4).reshape(2, 4, 4).astype(np.int64) * 8  # 0..248
    path = tmp_path / "x.npz"
    np.savez(path, only=images)  # the archive's only array
    np.testing.assert_array_equal(nd.read_images(path).images[..., 0], images)


@pytest.mark.parametrize(
    "array, problem",
    [
        (np.array([[[0, 256]]]), "values must lie in 0..255; found values in 0..256"),
        (np.array([[[-1, 3]]]), "values must lie in 0..255; found values in -1..3"),
        (np.zeros((2, 3, 3)), "integer dtype"),
        (np.zeros((2, 3, 3), bool), "integer dtype"),
        (np.zeros((2, 9), np.uint8), r"shape \(N, H, W\) or \(N, H, W, C\)"),
        (np.zeros((0, 3, 3), np.uint8), "non-empty"),
    ],
)
def test_bad_plain_arrays_raise(tmp_path, array, problem):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(ValueError, match=problem) as info:
        nd.read_images(path)
    assert str(path) in str(info.value)


def test_mixed_shapes_are_rejected(tmp_path):
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)
    path = tmp_path / "mixed.npy"
    np.save(path, mixed, allow_pickle=True)
    with pytest.raises(ValueError, match="object array") as info:
        nd.read_images(path)
    assert str(path) in str(info.value)
    path = tmp_path / "mixed.npz"
    np.savez(path, images=mixed)
    with pytest.raises(ValueError, match="object array"):
        nd.read_images(path)
    with pytest.raises(ValueError, match="mixed shapes"):
        nd.as_uint8_images([np.zeros((4, 4), np.uint8), np.zeros((5, 5), np.uint8)])


def test_unrecognised_inputs_raise(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        nd.read_images(tmp_path / "missing.npy")
    path = tmp_path / "images.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match="unrecognised image file"):
        nd.read_images(path)
    path = tmp_path / "two.npz"
    np.savez(path, a=np.zeros((1, 2, 2), np.uint8), b=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="cannot tell which array"):
        nd.read_images(path)


# ---------------------------------------------------------------------------------------------
# Digits and the grid writer


def test_digits_images():
    from sklearn.datasets import load_digits

    data = nd.load_digits_images()
    assert data.images.shape == (1797, 8, 8, 1) and data.images.dtype == np.uint8
    assert data.num_levels == 17
    assert data.images.min() == 0 and data.images.max() == 16
    np.testing.assert_array_equal(data.images[..., 0], load_digits().images)
    np.testing.assert_array_equal(data.labels, load_digits().target)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_image_grid_writes_a_png(tmp_path, channels):
    import matplotlib.image

    images = np.zeros((5, 8, 8, channels), np.uint8)  # black images on a white background
    path = tmp_path / "grid" / "samples.png"
    nd.save_image_grid(images, path, title="samples")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 8 and pixels.shape[1] > 8
    luminance = pixels[..., :3].mean(-1)
    assert luminance.min() < 0.05 and luminance.max() > 0.95  # both cells and gaps drawn
    # Floats in [0, 1] and digit levels (num_levels=17) are accepted too.
    nd.save_image_grid(np.full((2, 4, 4), 0.5), tmp_path / "floats.png")
    nd.save_image_grid(np.full((2, 4, 4), 16, np.uint8), tmp_path / "d.png", num_levels=17)
    with pytest.raises(ValueError, match="save_image_grid expects images"):
        nd.save_image_grid(np.zeros((2, 4, 4, 2)), tmp_path / "bad.png")
