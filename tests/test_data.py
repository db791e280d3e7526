import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vaekit.data import load_mnist5k, load_path, load_sklearn_digits, read_idx
from vaekit.errors import DataError


def test_mnist_split_is_per_class_and_interleaved():
    d = load_mnist5k()
    assert d.train_x.shape == (4000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.train_y).tolist() == [400] * 10
    assert d.test_y[:20].tolist() == list(range(10)) * 2
    assert 0.0 <= float(d.train_x.min()) and float(d.train_x.max()) == 1.0
    # train and test images are different digits
    train_set = {hash(x.numpy().tobytes()) for x in d.train_x}
    assert not any(hash(x.numpy().tobytes()) in train_set for x in d.test_x)


def test_mnist_slice_bad_sizes():
    with pytest.raises(DataError, match="sum <= 500"):
        load_mnist5k(450, 100)


def test_sklearn_digits():
    d = load_sklearn_digits()
    assert d.shape == (1, 8, 8)
    assert len(d.train_x) + len(d.test_x) == 1797
    assert float(d.train_x.max()) <= 1.0


def _write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def test_idx_folder_like_full_mnist(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)), gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (12,)), gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", rng.integers(0, 10, (5,)))
    d = load_path(str(tmp_path))
    assert d.train_x.shape == (12, 1, 28, 28) and d.test_x.shape == (5, 1, 28, 28)
    assert d.train_y.shape == (12,) and d.test_y.shape == (5,)


def test_single_idx_file_is_split(tmp_path):
    _write_idx(tmp_path / "x-images-idx3-ubyte", np.arange(20 * 4 * 4).reshape(20, 4, 4) % 256)
    d = load_path(str(tmp_path / "x-images-idx3-ubyte"), test_fraction=0.25)
    assert len(d.train_x) == 15 and len(d.test_x) == 5


def test_truncated_idx_is_a_data_error(tmp_path):
    p = tmp_path / "bad-images-idx3-ubyte"
    _write_idx(p, np.zeros((3, 4, 4)))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx(p)


def test_npz_with_split_and_npy(tmp_path):
    x = np.random.default_rng(0).random((30, 784)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x[:20], x_test=x[20:], y_train=np.arange(20) % 3, y_test=np.arange(10) % 3)
    d = load_path(str(tmp_path / "d.npz"), shape=(1, 28, 28))
    assert d.train_x.shape == (20, 1, 28, 28) and d.test_y.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    np.save(tmp_path / "v.npy", x)
    d = load_path(str(tmp_path / "v.npy"))
    assert d.shape == (784,) and len(d.train_x) == 27 and len(d.test_x) == 3


def test_channels_last_images_become_channels_first(tmp_path):
    np.save(tmp_path / "rgb.npy", np.zeros((10, 8, 12, 3), dtype=np.uint8))
    assert load_path(str(tmp_path / "rgb.npy")).shape == (3, 8, 12)


def test_image_folder_with_class_subfolders(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    d = load_path(str(tmp_path), test_fraction=0.2)
    assert d.shape == (1, 8, 8)
    assert sorted(torch.cat([d.train_y, d.test_y]).tolist()) == [0] * 5 + [1] * 5


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_text("hello"), "don't know how to read"),
        (lambda p: np.save(p, np.zeros(5)), "shape \\[N, ...\\]"),
        (lambda p: np.save(p, np.array([[0.0, np.nan], [1.0, 2.0], [3, 4]])), "NaN/inf"),
        (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot read"),
    ],
    ids=["missing", "unknown-kind", "wrong-shape", "nan", "corrupt-npy"],
)
def test_bad_data_files(tmp_path, make, message):
    name = "data.txt" if "know" in message else "data.npy"
    p = tmp_path / name
    make(p)
    with pytest.raises(DataError, match=message):
        load_path(str(p))


def test_images_of_different_sizes(tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), dtype=np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="differ in size"):
        load_path(str(tmp_path))
