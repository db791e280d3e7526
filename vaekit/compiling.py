"""``--compile``: the training step's forward pass through :func:`torch.compile`.

The objective's ``forward`` (encoder, posterior, the fused reparameterize + KL op, decoder, likelihood:
nearly all of the step's work, and its backward) is compiled as one graph (``fullgraph=True``; a plugin
whose code cannot be captured whole falls back to graphs split at what cannot, with a warning), for
fixed shapes (``dynamic=False``: the full batch and the epoch's last, smaller one, two compilations).
The loss (β-weighted terms, regularizers' penalties) and the regularizers' own updates run eagerly:
a β schedule changes a Python number every epoch, which a compiled loss would have to recompile for.
The first step on each new batch shape compiles, which takes seconds to a minute: its time is
measured and reported (``compile_seconds`` in the epoch's metrics, and a printed line), never hidden
in the throughput of later epochs.  A compiler failure (no working C++ compiler, a recompile limit)
is one line: ConfigError, "train without it: --compile off".

Modes are :func:`torch.compile`'s: ``default``; ``reduce-overhead`` (CUDA graphs on a GPU: the
launch overhead of small models' many kernels goes; on the CPU the same as ``default``);
``max-autotune`` (also searches matmul/convolution kernels; longer compile).  ``off`` runs eagerly.
Random ops (the reparameterization noise) draw from torch's generators as in the eager step
(inductor's ``fallback_random``), so a compiled run draws the same noise as an eager one and differs
from it by float rounding only.  Whether compiling pays depends on the model and the machine:
bench/README.md has the figures (on 2 CPU cores it does not, so it is not the default).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable

import torch

from .errors import ConfigError, first_line


class StepFunctions:
    """``forward(x, c) -> StepOutput`` of ``objective`` on ``model``, compiled with ``mode``
    (:data:`vaekit.config.Compile`; ``off``: eager).

    :meth:`timing` tells the trainer whether a step on a batch of some shape is the first (the one that
    compiles); :meth:`compiled_in` records how long it took.  ``seconds``: compile time so far (the
    first steps' wall time, backward included, since the backward graph compiles at the first backward).
    """

    def __init__(self, objective, model: torch.nn.Module, mode: str = "off") -> None:
        self.mode = mode
        self.seconds = 0.0
        self._shapes: set[tuple[int, ...]] = set()
        self._eager = lambda x, c: objective.forward(model, x, c)
        self.forward = self._eager if mode == "off" else self._whole_or_split(self._compile(fullgraph=True))

    def _compile(self, fullgraph: bool) -> Callable:
        import torch._inductor

        # the mode's settings, and random ops that draw from torch's generators as the eager step does (the
        # same noise for the same seed; inductor's own generator would give other draws)
        options = {**torch._inductor.list_mode_options(self.mode), "fallback_random": True}
        return torch.compile(self._eager, fullgraph=fullgraph, dynamic=False, options=options)

    def _whole_or_split(self, fn: Callable) -> Callable:
        def call(*args):
            try:
                return fn(*args)
            except torch._dynamo.exc.Unsupported as e:  # a plugin's Python the compiler cannot capture whole
                print(f"torch.compile: the forward pass cannot be compiled as one graph "
                      f"({first_line(e, 200)}); compiling it in pieces", file=sys.stderr, flush=True)
                self.forward = self._compile(fullgraph=False)
                return self.forward(*args)
        return call

    @contextlib.contextmanager
    def errors(self):
        """Around a training step (forward and backward, where the backward graph compiles): a compiler
        failure becomes ConfigError, one line."""
        if self.mode == "off":
            yield
            return
        import torch._dynamo

        try:
            yield
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            raise ConfigError(f"torch.compile ({self.mode}) failed: {first_line(e, 250)}; train without it: "
                              "--compile off") from None

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
