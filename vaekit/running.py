"""An epoch's running loss terms, summed on the device and read on the host now and then.

Reading a loss with ``.item()`` after every step makes the host wait for the device (on a GPU, the
whole queue of kernels drains before the next step is launched).  :class:`RunningTerms` instead keeps
each step's loss and terms side by side in one small tensor on the device; a
:meth:`~RunningTerms.flush` (every :data:`SYNC_EVERY` steps, before a checkpoint, at the end of the
epoch) reads all of them in one transfer, sums them over the ranks under torchrun, and raises if a
step's loss was NaN or inf, naming that step.  The figures are the same as per-step reads'; only the
moment the host learns them moves: a NaN is found up to ``SYNC_EVERY − 1`` optimizer steps (and
``on_step_end`` calls) after it happened, always before a checkpoint could keep its weights.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

SYNC_EVERY = 20
"""Steps between two host reads of the running terms (the progress bar moves at each)."""


class RunningTerms:
    """Sums of the loss terms × samples of an epoch so far, and their sample count.

    ``sums`` / ``count``: the host figures to start from (a resumed epoch's), already summed over the
    ranks.  ``dist``: the run's :class:`~vaekit.distributed.Single` or ``Distributed`` (its
    ``batch_sums`` reduces a flushed window over the ranks).  A flush adds the steps to the sums one
    after the other, each term read as a float and multiplied by the step's samples, as reading it
    after every step did: the figures are the same bit for bit wherever the flushes fall (a resumed
    epoch flushes at its checkpoint, the uninterrupted one does not).
    """

    def __init__(self, dist, sums: dict[str, float] | None = None, count: int = 0) -> None:
        self.dist = dist
        self.sums: dict[str, float] = dict(sums or {})
        self.count = count
        self._steps: list[tuple[list[str], torch.Tensor, int]] = []  # (names, values, samples) since the last flush
        self._first_step = 0  # the run's step number of the window's first step

    @property
    def pending(self) -> int:
        """Steps added since the last flush."""
        return len(self._steps)

    def add(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor], extra: dict[str, Any], n: int) -> None:
        """Add one step: its mean ``loss`` (0-d tensor), its ``terms`` (one-element tensors, means over its
        ``n`` samples; a ``loss`` entry is taken from ``loss``) and a regularizer's ``extra`` means
        (floats or one-element tensors, added to a term of the same name).  ``step``: the run's step
        number of this step (counted from 1).  No host sync: the step's values are copied into one
        small tensor on the device (a copy, so a compiled step's reused output buffers, CUDA graphs',
        cannot change them) and read at :meth:`flush`."""
        if not self._steps:
            self._first_step = step
        keys = [_LOSS, *terms, *extra]
        values = [loss, *(loss if k == "loss" else v for k, v in terms.items()),
                  *(v if isinstance(v, torch.Tensor) else torch.tensor(float(v), device=loss.device) for v in extra.values())]
        with torch.no_grad():  # one op: the values side by side (dtypes promoted: float32 or wider, exact)
            row = torch.stack([v if v.dim() == 0 else v.reshape(()) for v in values])
        self._steps.append((keys, row, n))

    def flush(self, failed: Callable[[float, int], BaseException]) -> None:
        """Read the window's terms on the host (one transfer; under torchrun one all-reduce) and add them to
        :attr:`sums` / :attr:`count`.  Raises ``failed(value, step)`` (a TrainingError) if a step's loss —
        the global batch's, under torchrun — was NaN or inf: ``value`` that loss, ``step`` its number,
        the first such step of the window (the steps before it are added)."""
        if not self._steps:
            return
        steps, first_step, self._steps = self._steps, self._first_step, []
        numbers = iter(torch.cat([row.double() for _, row, _ in steps]).tolist())  # the one transfer
        local: dict[str, float] = {}
        for i, (keys, _, n) in enumerate(steps):
            for k in keys:  # a regularizer's own figure of a term's name adds to it (as per-step reads did)
                local[f"{k}\0{i}"] = local.get(f"{k}\0{i}", 0.0) + next(numbers) * n
            local[f"\0n\0{i}"] = float(n)
        reduced, _ = self.dist.batch_sums(local, 0)  # one process: as given; torchrun: summed over the ranks
        for i, (keys, _, _) in enumerate(steps):
            size = reduced[f"\0n\0{i}"]
            value = reduced[f"{_LOSS}\0{i}"] / size  # the (global) batch's mean loss
            if not math.isfinite(value):
                raise failed(value, first_step + i)
            self.count += int(round(size))
            for k in dict.fromkeys(keys):
                if k != _LOSS:
                    self.sums[k] = self.sums.get(k, 0.0) + reduced[f"{k}\0{i}"]


_LOSS = "\0loss"  # the step's loss, kept beside its terms for the NaN/inf check
