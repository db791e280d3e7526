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


def test_bundled_datasets_say_how_they_were_scaled():
    assert load_mnist5k(1, 1).scaling == "uint8 / 255"
    assert load_sklearn_digits().scaling == "0..16 / 16"


def test_16_bit_png_folder_is_scaled_by_65535(tmp_path):
    # a gradient over the whole 16-bit range; Pillow writes uint16 arrays as mode I;16 PNGs
    ramp = np.linspace(0, 65535, 6 * 8 * 8).round().astype(np.uint16).reshape(6, 8, 8)
    for i, arr in enumerate(ramp):
        im = Image.fromarray(arr)
        assert im.mode == "I;16"
        im.save(tmp_path / f"{i}.png")
    d = load_path(str(tmp_path), test_fraction=0.5)
    loaded = torch.cat([d.train_x, d.test_x]).squeeze(1).double()
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535)
    # the split permutes the images: match each loaded image to the one it came from by its first pixel
    order = torch.argsort(loaded[:, 0, 0])
    assert torch.allclose(loaded[order], expected, atol=1e-6, rtol=0)
    assert d.scaling == "16-bit images / 65535"


def test_mode_i_images_are_scaled_by_their_range(tmp_path):
    arr = np.arange(64, dtype=np.int32).reshape(8, 8) * 1000  # 0 .. 63,000: 16-bit values in a 32-bit image
    for i in range(2):
        Image.fromarray(arr).save(tmp_path / f"{i}.tif")
    assert Image.open(tmp_path / "0.tif").mode == "I"
    d = load_path(str(tmp_path), test_fraction=0.5)
    assert torch.allclose(d.train_x[0, 0].double(), torch.from_numpy(arr / 65535), atol=1e-6, rtol=0)
    assert d.scaling == "16-bit images / 65535"
    Image.fromarray(arr * 30000).save(tmp_path / "1.tif")  # up to 1.89e9: the full 32-bit range
    d = load_path(str(tmp_path), test_fraction=0.5)
    assert d.scaling == "32-bit integer images / 2147483647"
    Image.fromarray(arr - 1).save(tmp_path / "1.tif")
    with pytest.raises(DataError, match="negative pixel values"):
        load_path(str(tmp_path))


def test_8_bit_folder_is_scaled_by_255(tmp_path):
    imgs = np.arange(2 * 64, dtype=np.uint8).reshape(2, 8, 8) * 2
    for i, arr in enumerate(imgs):
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
    d = load_path(str(tmp_path), test_fraction=0.5)
    loaded = torch.cat([d.train_x, d.test_x]).squeeze(1)
    order = torch.argsort(loaded[:, 0, 0])
    assert torch.equal(loaded[order], torch.from_numpy(imgs.astype(np.float32) / 255))
    assert d.scaling == "8-bit images / 255"


def test_folder_mixing_bit_depths_and_colour(tmp_path):
    Image.fromarray(np.full((8, 8), 51, dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 13107, dtype=np.uint16)).save(tmp_path / "b.png")
    d = load_path(str(tmp_path), test_fraction=0.5)
    assert d.shape == (1, 8, 8)
    assert torch.allclose(torch.cat([d.train_x, d.test_x]), torch.full((2, 1, 8, 8), 0.2))
    assert d.scaling == "per image: 16-bit images / 65535; 8-bit images / 255"
    Image.fromarray(np.full((8, 8, 3), 102, dtype=np.uint8)).save(tmp_path / "c.png")
    d = load_path(str(tmp_path), test_fraction=0.34)
    assert d.shape == (3, 8, 8)
    values = sorted(float(v) for v in torch.cat([d.train_x, d.test_x]).amax((1, 2, 3)))
    assert values == pytest.approx([0.2, 0.2, 0.4])


@pytest.mark.parametrize(
    "array,expected,scaling",
    [
        (np.array([[0, 1], [1, 0], [1, 1]], dtype=np.uint8), [[0, 1], [1, 0], [1, 1]], "none (integers already 0/1)"),
        (np.array([[0, 255], [51, 0], [255, 102]], dtype=np.uint8), [[0, 1], [0.2, 0], [1, 0.4]], "uint8 / 255"),
        (np.array([[0, 65535], [13107, 0], [65535, 0]], dtype=np.uint16), [[0, 1], [0.2, 0], [1, 0]],
         "uint16 / 65535"),
        (np.array([[True, False], [False, True], [True, True]]), [[1, 0], [0, 1], [1, 1]], "none (boolean 0/1)"),
        (np.array([[0, 255], [51, 0], [255, 102]], dtype=np.int64), [[0, 1], [0.2, 0], [1, 0.4]],
         "int64 in [0, 255] / 255"),
        (np.array([[0, 300], [-3, 0], [1, 2]], dtype=np.int32), [[0, 300], [-3, 0], [1, 2]],
         "none (int32 in [-3, 300])"),
        (np.array([[0, 255], [51, 0], [255, 102]], dtype=np.float32), [[0, 255], [51, 0], [255, 102]],
         "none (float data)"),
    ],
    ids=["uint8-0/1", "uint8", "uint16", "bool", "int64-8bit", "int32-other", "float"],
)
def test_arrays_are_scaled_by_their_dtype(tmp_path, array, expected, scaling):
    np.savez(tmp_path / "d.npz", x_train=array[:2], x_test=array[2:])
    d = load_path(str(tmp_path / "d.npz"))
    assert torch.allclose(torch.cat([d.train_x, d.test_x]), torch.tensor(expected, dtype=torch.float32), atol=1e-7)
    assert d.scaling == scaling


def test_npy_uint8_binary_loads_as_exact_0_1(tmp_path):
    x = (np.random.default_rng(0).random((20, 4, 4)) > 0.5).astype(np.uint8)
    np.save(tmp_path / "b.npy", x)
    d = load_path(str(tmp_path / "b.npy"))
    assert set(torch.cat([d.train_x, d.test_x]).unique().tolist()) == {0.0, 1.0}
    assert float(torch.cat([d.train_x, d.test_x]).sum()) == float(x.sum())
    assert d.scaling == "none (integers already 0/1)"


def test_train_and_test_are_scaled_together(tmp_path):
    # a test split that happens to hold only 0 and 1 is still uint8 / 255, like its train split
    train, test = np.array([[0, 255]], dtype=np.uint8), np.array([[0, 1]], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=train, x_test=test)
    d = load_path(str(tmp_path / "d.npz"))
    assert d.test_x[0].tolist() == pytest.approx([0.0, 1 / 255]) and d.scaling == "uint8 / 255"
    np.savez(tmp_path / "e.npz", x_train=np.array([[0, 255]], dtype=np.uint8), x_test=np.array([[0, 0.5]]))
    with pytest.raises(DataError, match="train data \\(uint8\\) would be scaled as 'uint8 / 255' but test data"):
        load_path(str(tmp_path / "e.npz"))


# --- classes=: keep some classes ----------------------------------------------------------------

def test_classes_option_keeps_those_classes_in_both_splits_with_their_labels():
    """``digits:classes=0,3`` holds exactly the 0s and 3s of each split of scikit-learn's digits (the same
    images, in order, labels not renumbered); ``mnist:classes=0`` the zeros of the bundled digits."""
    from sklearn.datasets import load_digits

    import vaekit

    full, kept = load_sklearn_digits(), vaekit.load_data("digits:classes=3,0")
    sk = load_digits()
    assert len(kept.train_x) + len(kept.test_x) == int(np.isin(sk.target, [0, 3]).sum())  # 178 + 183
    for x, y, fx, fy in ((kept.train_x, kept.train_y, full.train_x, full.train_y),
                         (kept.test_x, kept.test_y, full.test_x, full.test_y)):
        mask = (fy == 0) | (fy == 3)
        assert torch.equal(x, fx[mask]) and torch.equal(y, fy[mask])
        assert set(y.tolist()) == {0, 3}
    zeros = vaekit.load_data("mnist:classes=0,train_per_class=7,test_per_class=3")
    assert zeros.train_y.tolist() == [0] * 7 and zeros.test_y.tolist() == [0] * 3
    assert torch.equal(zeros.train_x, load_mnist5k(7, 3).train_x[:7])  # the first class of the per-class split
    assert vaekit.load_data("digits:classes=").train_x.shape == full.train_x.shape  # empty: every class


def test_classes_option_of_files(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.random((12, 4)).astype(np.float32), y_train=np.arange(12) % 4,
             x_test=rng.random((8, 4)).astype(np.float32), y_test=np.array([1, 2, 1, 3, 3, 3, 1, 1]))
    import vaekit

    d = vaekit.load_data(f"file:path={path},classes=1,2")
    assert d.train_y.tolist() == [1, 2, 1, 2, 1, 2] and d.test_y.tolist() == [1, 2, 1, 1, 1]
    with pytest.raises(DataError, match="classes=0 leaves the test split empty"):
        vaekit.load_data(f"file:path={path},classes=0")
    with pytest.raises(DataError, match="no sample has class 5,9; the classes present are 0,1,2,3"):
        vaekit.load_data(f"file:path={path},classes=1,5,9")
    np.save(tmp_path / "plain.npy", rng.random((10, 4)).astype(np.float32))
    with pytest.raises(DataError, match="classes=1 needs labelled data"):
        vaekit.load_data(f"file:path={tmp_path / 'plain.npy'},classes=1")
