"""Reproducible draws from torch's global random streams without disturbing them."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def seeded_noise(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the body with torch's global RNG seeded with ``seed``, restoring the caller's RNG state afterwards.

    Plugins draw their Monte-Carlo noise (ε of the reparameterisation) from the global RNG, so this
    makes any prior's draws reproducible without a generator argument.  The CPU stream is forked
    always, the CUDA stream of ``device`` when it is a CUDA device (``torch.random.fork_rng``);
    other streams are neither touched nor seeded.  ``seed=None`` runs the body unseeded, drawing
    from (and advancing) the caller's streams.
    """
    if seed is None:
        yield
        return
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def seed_from(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from ``generator`` (advancing it by one draw)."""
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


def derived_seed(seed: int, index: int) -> int:
    """Seed number ``index`` derived from ``seed``: ``seed`` itself for index 0, else a 62-bit seed drawn from
    ``numpy.random.SeedSequence([seed, index])`` (distinct, well-mixed streams for distinct indices).
    A rank's noise stream (:func:`vaekit.distributed.rank_seed`) and an evaluation batch's
    (:func:`vaekit.evaluation.batch_seed`) are seeded with it."""
    if index == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(2))
