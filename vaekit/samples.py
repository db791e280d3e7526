"""Samples read batch by batch as float32: held in memory in their source dtype, read from a ``.npy``
file on disk, or decoded from image files when a batch needs them.

A :class:`Samples` is what a :class:`~vaekit.data.DataBundle` holds for each split and what the
trainer draws its mini-batches from (:func:`load_batches`); only the batch being read is ever
converted to float32.  docs/data.md says which kind a dataset gets and what stays in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import DataError, VaekitError

CHUNK_BYTES = 16 << 20
"""How much of a file a scan reads at once (ordinary reads, never through a mapping): 16 MiB."""


def to_float(values: torch.Tensor, divisor: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``values`` (any dtype) as float32 divided by ``divisor`` in float32, as numpy's
    ``a.astype(np.float32) / np.float32(divisor)`` computes it (bit for bit).  ``divisor``: a number,
    or a float32 0-d tensor on ``values``' device (no host-to-device copy per call)."""
    x = values.to(torch.float32)
    if not isinstance(divisor, torch.Tensor):
        if divisor == 1.0:
            return x
        divisor = torch.tensor(divisor, dtype=torch.float32, device=x.device)
    return x / divisor if x is values else x.div_(divisor)  # a converted copy is divided in place


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``.  From the CPU to CUDA the copy goes through pinned (page-locked) memory and
    does not block the host (``non_blocking``; it is ordered on the current stream before the kernels
    that read it), so reading the next batch overlaps the device's work."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


def torch_dtype_ready(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order and a dtype torch holds and indexes without loss of range:
    uint16 becomes int32, uint32 int64, uint64 float64 and float16 float32 (the values are unchanged)."""
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))
    wider = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.float64,
             np.dtype(np.float16): np.float32}
    return a.astype(wider[a.dtype]) if a.dtype in wider else a


class Samples:
    """N samples of shape ``S``, read as float32 batches ``[B, *S]`` scaled as their dataset says.

    Implementations: :class:`ArraySamples` (a tensor in memory), :class:`NpyRows` (rows of a ``.npy``
    file read from disk), :class:`ImageFiles` (image files decoded on demand).  ``in_memory`` is
    False for the last two: :meth:`tensor` then raises DataError instead of allocating them whole.
    """

    in_memory = True
    shape: tuple[int, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def full_shape(self) -> tuple[int, ...]:
        """``(N, *S)``."""
        return (len(self), *self.shape)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """The samples at ``index [B]`` (int64 positions) as float32 ``[B, *S]``, scaled."""
        raise NotImplementedError

    def subset(self, rows: torch.Tensor) -> "Samples":
        """The samples at ``rows [M]`` (int64 positions), in that order, as Samples of the same kind."""
        raise NotImplementedError

    def __getitem__(self, key) -> torch.Tensor:
        """Samples as float32, indexed as the rows of a tensor: ``samples[i:j]`` ``[B, *S]`` (a slice; steps
        too), ``samples[index]`` (int64 positions ``[B]``), ``samples[i]`` ``[*S]`` (negative positions count
        from the end; IndexError out of range).  So evaluation and
        figures read a split held in its source dtype a batch at a time, as they read a float tensor."""
        if isinstance(key, slice):
            return self.batch(torch.arange(*key.indices(len(self))))
        index = torch.as_tensor(key, dtype=torch.int64)
        if index.dim() > 1:
            raise IndexError(f"samples are indexed by a slice, an int or positions [B], got an index of shape {tuple(index.shape)}")
        if ((index < -len(self)) | (index >= len(self))).any():
            raise IndexError(f"index out of range for {len(self)} samples")
        rows = self.batch(torch.where(index < 0, index + len(self), index).reshape(-1))  # negatives count from the end
        return rows[0] if index.dim() == 0 else rows

    def extremes(self) -> torch.Tensor:
        """``[2, *S]`` float32: the per-pixel minimum (row 0) and maximum (row 1) over the samples, or
        bounds of them; what the support checks (:func:`vaekit.training.check_inputs`) look at."""
        raise NotImplementedError

    def check_finite(self, what: str) -> None:
        """Raise DataError (one line) if a value is NaN or infinite; ``what`` names the data."""

    def tensor(self) -> torch.Tensor:
        """Every sample as float32 ``[N, *S]`` (a new tensor unless held as float32 already)."""
        return self.batch(torch.arange(len(self)))

    def describe(self) -> str:
        """What is held and where, in words (printed in a run's first line)."""
        raise NotImplementedError


class ArraySamples(Samples):
    """Samples held in memory as ``values [N, *S]`` in their source dtype (uint8 pixels stay uint8),
    converted per batch by :func:`to_float` with ``divisor`` (255 for uint8 pixels)."""

    def __init__(self, values: torch.Tensor, divisor: float = 1.0) -> None:
        self.values = values
        self.divisor = float(divisor)
        self.shape = tuple(values.shape[1:])
        # made once, on the values' device (1: no division at all)
        self._divisor = 1.0 if self.divisor == 1.0 else torch.tensor(self.divisor, dtype=torch.float32, device=values.device)

    def __len__(self) -> int:
        return int(self.values.shape[0]) if self.values.dim() else 0

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        # index_select copies whole rows (a batch of 128 uint8 digits: 9 µs, against 50 for values[index])
        return to_float(torch.index_select(self.values, 0, to_device(index, self.values.device)), self._divisor)

    def subset(self, rows: torch.Tensor) -> "ArraySamples":
        return ArraySamples(self.values[to_device(rows, self.values.device)], self.divisor)

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):  # a view of the rows, converted: no index tensor
            return to_float(self.values[key], self.divisor)
        return super().__getitem__(key)

    def to(self, device: torch.device) -> "ArraySamples":
        return ArraySamples(self.values.to(device), self.divisor)

    def tensor(self) -> torch.Tensor:
        return to_float(self.values, self.divisor)

    def extremes(self) -> torch.Tensor:
        v = self.values
        if v.dtype == torch.bool:
            v = v.to(torch.uint8)
        if not len(self):
            return torch.zeros((2, *self.shape))
        return to_float(torch.stack([v.amin(0), v.amax(0)]), self.divisor)

    def check_finite(self, what: str) -> None:
        if not self.values.is_floating_point():
            return
        bad = first = 0
        for b0 in range(0, len(self), 4096):
            rows = ~torch.isfinite(self.values[b0:b0 + 4096])
            n = int(rows.sum())
            if n and not bad:
                first = b0 + int(rows.flatten(1).any(1).nonzero()[0])
            bad += n
        if bad:
            raise DataError(f"{what} contains {bad} NaN/inf values (first in sample {first})")

    def describe(self) -> str:
        mb = self.values.numel() * self.values.element_size() / 1e6
        return f"in memory as {str(self.values.dtype).replace('torch.', '')} ({mb:,.0f} MB)"


class BitSamples(Samples):
    """0/1 samples held as packed bits: one bit a value (:func:`numpy.packbits` of each flattened sample,
    an eighth of uint8), unpacked to float32 per batch.  What a binarized test split is held as
    (:func:`vaekit.data.binarize_samples`): 190,000 28x28 digits take 19 MB instead of 149 MB.

    :param packed: uint8 ``[N, ceil(D / 8)]``, ``D = prod(shape)``.  :param shape: one sample's shape ``S``.
    """

    def __init__(self, packed: np.ndarray, shape: tuple[int, ...]) -> None:
        self.packed, self.shape = packed, tuple(shape)

    @classmethod
    def from_binary(cls, values: torch.Tensor) -> "BitSamples":
        """Pack ``values [N, *S]`` (0/1, any dtype)."""
        flat = values.reshape(len(values), -1).to(torch.bool).cpu().numpy()
        return cls(np.packbits(flat, axis=1), tuple(values.shape[1:]))

    def __len__(self) -> int:
        return len(self.packed)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        rows = self.packed[index.cpu().numpy()]
        bits = np.unpackbits(rows, axis=1, count=int(np.prod(self.shape, dtype=np.int64)))
        return torch.from_numpy(bits).to(torch.float32).reshape(len(rows), *self.shape)

    def subset(self, rows: torch.Tensor) -> "BitSamples":
        return BitSamples(self.packed[rows.cpu().numpy()], self.shape)

    def extremes(self) -> torch.Tensor:
        if not len(self):
            return torch.zeros((2, *self.shape))
        lo = np.bitwise_and.reduce(self.packed, axis=0)  # a bit set in every sample
        hi = np.bitwise_or.reduce(self.packed, axis=0)  # a bit set in some sample
        d = int(np.prod(self.shape, dtype=np.int64))
        return torch.from_numpy(np.unpackbits(np.stack([lo, hi]), axis=1, count=d)).to(torch.float32).reshape(2, *self.shape)

    def describe(self) -> str:
        return f"in memory as packed bits ({self.packed.nbytes / 1e6:,.0f} MB)"


class NpyRows(Samples):
    """Rows of a C-ordered ``.npy`` file read from disk batch by batch (``--data big.npy``).

    The file is opened with ``np.load(mmap_mode="r")`` for its layout (dtype, shape, data offset);
    the rows of each batch are then read with positioned reads (``os.pread``), not through the
    mapping, so pages read do not stay in the process's resident memory (RSS) as the epoch goes.

    :param path: the ``.npy`` file.
    :param offset: byte offset of its data.  :param dtype: its dtype.  :param row_shape: one row's shape.
    :param rows: the file rows these samples are, int64 ``[N]`` (a train split of a permutation).
    :param divisor: the scaling divisor (:func:`to_float`).
    :param arrange: maps a raw batch ``[B, *row_shape]`` to ``[B, *S]`` (reshape, channels first).
    :param extremes: the per-pixel extremes ``[2, *S]`` found by the scan at load time.
    """

    in_memory = False

    def __init__(self, path: Path, offset: int, dtype: np.dtype, row_shape: tuple[int, ...], rows: np.ndarray,
                 divisor: float, arrange: Callable[[torch.Tensor], torch.Tensor], extremes: torch.Tensor) -> None:
        self.path, self.offset, self.dtype, self.row_shape = Path(path), int(offset), np.dtype(dtype), tuple(row_shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.divisor, self.arrange, self._extremes = float(divisor), arrange, extremes
        self.row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.shape = tuple(arrange(torch.empty((0, *row_shape), dtype=torch.uint8)).shape[1:])
        self._fd: int | None = None
        self._pid = -1

    def __getstate__(self):  # DataLoader workers open the file themselves
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, -1
        return state

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)

    def __len__(self) -> int:
        return len(self.rows)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def read_rows(self, file_rows: np.ndarray) -> np.ndarray:
        """File rows ``file_rows [B]`` as a numpy array ``[B, *row_shape]`` (source dtype, native order)."""
        fd, size = self._file(), self.row_bytes
        out = np.empty((len(file_rows), *self.row_shape), dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        for j, r in enumerate(file_rows):
            if os.preadv(fd, [view[j * size:(j + 1) * size]], self.offset + int(r) * size) != size:
                raise DataError(f"{self.path.name}: the file is shorter than its header says (truncated?)")
        return torch_dtype_ready(out)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        return to_float(self.arrange(torch.from_numpy(self.read_rows(self.rows[index.cpu().numpy()]))), self.divisor)

    def subset(self, rows: torch.Tensor) -> "NpyRows":
        return NpyRows(self.path, self.offset, self.dtype, self.row_shape, self.rows[rows.cpu().numpy()],
                       self.divisor, self.arrange, self._extremes)

    def extremes(self) -> torch.Tensor:
        return self._extremes

    def check_finite(self, what: str) -> None:
        """Nothing to do: :func:`scan_npy` checked the whole file when it was opened."""

    def describe(self) -> str:
        return f"read from {self.path.name} batch by batch ({len(self) * self.row_bytes / 1e6:,.0f} MB on disk)"


def scan_npy(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...], name: str):
    """One pass over a ``.npy`` file's data in :data:`CHUNK_BYTES` chunks of ordinary reads (no
    mapping is touched, so the scan adds at most a chunk to RSS).  Returns the per-pixel raw
    minimum and maximum ``[row_shape]`` each, and the integer range ``(lo, hi)`` of the data (0, 0 for
    float and bool data).  Raises DataError if a float value is NaN/inf (naming the first sample)."""
    dtype = np.dtype(dtype)
    n, row_shape = shape[0], shape[1:]
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
    per_chunk = max(1, CHUNK_BYTES // row_bytes)
    lo_px = hi_px = None
    with open(path, "rb") as f:
        for r0 in range(0, n, per_chunk):
            m = min(per_chunk, n - r0)
            f.seek(offset + r0 * row_bytes)
            data = f.read(m * row_bytes)
            if len(data) != m * row_bytes:
                raise DataError(f"{name}: the file is shorter than its header says (truncated?)")
            a = np.frombuffer(data, dtype=dtype).reshape((m, *row_shape))
            if dtype.kind == "f":
                finite = np.isfinite(a).reshape(m, -1).all(1)
                if not finite.all():
                    raise DataError(f"{name}: the data contains NaN/inf values (first in sample {r0 + int(np.argmin(finite))})")
            if dtype.kind == "b":
                a = a.view(np.uint8)
            lo_c, hi_c = a.min(0), a.max(0)
            lo_px = lo_c if lo_px is None else np.minimum(lo_px, lo_c)
            hi_px = hi_c if hi_px is None else np.maximum(hi_px, hi_c)
    lo = hi = 0
    if dtype.kind in "iu" and lo_px is not None:
        lo, hi = int(lo_px.min()), int(hi_px.max())
    return lo_px, hi_px, (lo, hi)


class ImageFiles(Samples):
    """Image files decoded when a batch needs them (``--data FOLDER`` with ``lazy``), through Pillow.

    :param files: the image files, one per sample.
    :param decode: maps a file to its scaled float32 pixels ``[*S]`` (:func:`vaekit.data.decode_image`).
    :param shape: the sample shape ``S`` (``(C, H, W)``).
    :param bounds: the per-pixel extremes ``[2, *S]`` (the images' value range, e.g. 0 and 1).
    """

    in_memory = False

    def __init__(self, files: Sequence[Path], decode: Callable[[Path], torch.Tensor], shape: tuple[int, ...],
                 bounds: torch.Tensor) -> None:
        self.files, self.decode, self.shape, self.bounds = list(files), decode, tuple(shape), bounds

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        if not len(index):
            return torch.zeros((0, *self.shape))
        return torch.stack([self.decode(self.files[int(i)]) for i in index])

    def subset(self, rows: torch.Tensor) -> "ImageFiles":
        return ImageFiles([self.files[int(i)] for i in rows], self.decode, self.shape, self.bounds)

    def extremes(self) -> torch.Tensor:
        return self.bounds

    def describe(self) -> str:
        return f"decoded from {len(self)} image files batch by batch"


class _BatchReader(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches: ``reader[index [B]]`` is ``samples.batch(index)``."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return self.samples.batch(index)


def load_batches(samples: Samples, index_batches: Iterable[torch.Tensor], workers: int = 0,
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """``samples.batch(index)`` for each ``index`` of ``index_batches``, in their order.

    ``workers`` 0 reads in this process; N > 0 reads samples read from disk (``in_memory`` False)
    through a :class:`torch.utils.data.DataLoader` with N worker processes that prefetch the next
    batches (the order, and so every result, is the same for any N: the index batches decide it).
    Samples in memory (perhaps on a GPU) are always read in this process.  ``pin_memory``: the
    loader's batches come in pinned memory (for :func:`to_device` to a GPU)."""
    if workers <= 0 or samples.in_memory:
        for index in index_batches:
            yield samples.batch(index)
        return
    # a generator of its own: the loader draws its workers' base seed from it, not from torch's global
    # stream (the model's noise), so the run's results do not depend on ``workers``
    loader = torch.utils.data.DataLoader(_BatchReader(samples), sampler=list(index_batches), batch_size=None,
                                         num_workers=workers, generator=torch.Generator().manual_seed(0),
                                         pin_memory=pin_memory)
    try:
        yield from loader
    except VaekitError as e:  # re-raised by the loader as "Caught DataError in DataLoader worker…" + a traceback
        raise type(e)(worker_error_line(e)) from None


def worker_error_line(e: BaseException) -> str:
    """The original one-line message of an error a DataLoader worker raised (the loader re-raises it
    with its traceback in the message): the traceback's last line, less the exception's name."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for name in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__qualname__}: "):
        if last.startswith(name):
            return last[len(name):]
    return last


__all__ = ["ArraySamples", "ImageFiles", "NpyRows", "Samples", "load_batches", "scan_npy", "to_device", "to_float",
           "torch_dtype_ready", "worker_error_line"]
