"""``--compile``: the training step's forward pass and loss through :func:`torch.compile`.

The objective's ``forward`` (encoder, posterior, the fused reparameterize + KL op, decoder, likelihood)
and its ``loss`` (terms, penalties) are compiled as two whole graphs (``fullgraph=True``; a plugin
whose code cannot be captured whole falls back to graphs split at what cannot, with a warning), for
fixed shapes (``dynamic=False``: the full batch and the epoch's last, smaller one, two compilations
each).  The regularizers' own updates (the AAE discriminator's step) run eagerly between the two.
The first step on each new batch shape compiles, which takes seconds to a minute: its time is
measured and reported (``compile_seconds`` in the epoch's metrics, and a printed line), never
hidden in the throughput of later epochs.

Modes are :func:`torch.compile`'s: ``default``; ``reduce-overhead`` (CUDA graphs on a GPU: the
launch overhead of small models' many kernels goes; on the CPU the same as ``default``);
``max-autotune`` (also searches matmul/convolution kernels; longer compile).  ``off`` runs eagerly.
Random ops (the reparameterization noise) draw from torch's generators as in the eager step
(inductor's ``fallback_random``), so a compiled run draws the same noise as an eager one and differs
from it by float rounding only.
Whether compiling pays depends on the model and the machine: bench/README.md has the figures
(on 2 CPU cores it is not the default).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


class StepFunctions:
    """``forward(x, c) -> StepOutput`` and ``loss(record) -> (loss, terms)`` of ``objective`` on ``model``,
    compiled with ``mode`` (one of :data:`COMPILE_MODES`; ``off``: eager).

    :meth:`timing` tells the trainer whether a step on a batch of some shape is the first (the one that
    compiles); :meth:`compiled_in` records how long it took.  ``seconds``: compile time so far (the
    first steps' wall time, backward included, since the backward graph compiles at the first backward).
    """

    def __init__(self, objective, model: torch.nn.Module, mode: str = "off") -> None:
        self.mode = mode
        self.seconds = 0.0
        self._shapes: set[tuple[int, ...]] = set()
        self._eager = (lambda x, c: objective.forward(model, x, c), lambda record: objective.loss(model, record))
        self.forward, self.loss = self._compile(fullgraph=True) if mode != "off" else self._eager

    def _compile(self, fullgraph: bool) -> tuple[Callable, Callable]:
        import torch._inductor

        # the mode's settings, and random ops that draw from torch's generators as the eager step does (the
        # same noise for the same seed; inductor's own generator would give other draws)
        options = {**torch._inductor.list_mode_options(self.mode), "fallback_random": True}
        compiled = [torch.compile(fn, fullgraph=fullgraph, dynamic=False, options=options) for fn in self._eager]
        if not fullgraph:
            return compiled[0], compiled[1]
        return self._whole_or_split(compiled[0], 0), self._whole_or_split(compiled[1], 1)

    def _whole_or_split(self, fn: Callable, which: int) -> Callable:
        def call(*args):
            try:
                return fn(*args)
            except torch._dynamo.exc.Unsupported as e:  # a plugin's Python the compiler cannot capture whole
                print(f"torch.compile: the {('forward pass', 'loss')[which]} cannot be compiled as one graph "
                      f"({str(e).splitlines()[0][:200]}); compiling it in pieces", file=sys.stderr, flush=True)
                split = self._compile(fullgraph=False)
                self.forward, self.loss = split
                return split[which](*args)
        return call

    def timing(self, x: torch.Tensor) -> float | None:
        """``time.perf_counter()`` if the step about to run on the batch ``x`` compiles (its shape is new and
        compiling is on), else None."""
        if self.mode == "off" or tuple(x.shape) in self._shapes:
            return None
        self._shapes.add(tuple(x.shape))
        return time.perf_counter()

    def compiled_in(self, start: float, device: torch.device) -> float:
        """Record the end of a compiling step begun at ``start``; returns its seconds."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        return seconds
