"""``vaekit::sparse_input_linear``: ``x Wᵀ + b`` computed from the nonzeros of ``x``, for inputs that are mostly zero.

Binarized images are: dynamically binarized MNIST has 13–18 % ones, so a dense GEMM over the first layer's
``[B, 784]`` input multiplies zeros five times in six.  On the CPU (float32/float64) the C++ op
(``csrc/sparse_input_linear.cpp``) lists each row's nonzeros and sums the picked columns of W,
``y[b] = b + Σ_{j: x_bj ≠ 0} x_bj W[:, j]``, and likewise builds ``∂L/∂W = gᵀ x`` column by column from
the rows of ``g`` that ``x`` picks, so both cost ``O(nnz · N)`` instead of ``O(B · K · N)``.  Measured for
the 784→400 layer of the MNIST VAE on this project's 2-core machine (2 threads, forward + backward,
``python bench/bench_sparse_linear.py``, 2026-12-05): 0.58 against 1.10 ms for torch's ``linear`` on a batch
of 128 dynamically binarized digits (17 % ones), 0.71 on the same digits in gray levels (25 % nonzero); on
uniformly random 0/1 inputs 0.54/0.87/1.11/1.33/1.53 ms at 10/20/30/40/50 % ones against 1.08–1.21 ms
(784→1000: the same break-even, ~35 %).  Above :data:`MAX_DENSITY` the op computes ``at::linear`` itself (after the one pass
over ``x`` that counts its nonzeros).  Weights whose column meets only zeros of ``x`` take no part, so an inf or
NaN there does not reach ``y`` as it would through ``0 · inf`` in a GEMM.  ``∂L/∂x`` (only when ``x`` requires a
gradient) is the dense ``g W``.

Sums run in another order than a GEMM's, so results agree with ``F.linear`` to rounding, not bit for bit.
Elsewhere (other devices and dtypes, no C++ compiler, under ``torch.compile``, TorchScript, ``torch.func``
transforms, forward-mode AD or CPU autocast, whose bf16/fp16 GEMM it leaves to ``F.linear``)
:func:`sparse_input_linear` is ``F.linear``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu_kernel

MAX_DENSITY = 0.3
"""The largest share of nonzeros in ``x`` for which the sparse kernel runs (else the dense ``at::linear``):
below the break-even measured above (~35 % at 784→400 and 784→1000), where the kernel is still ~1.1× faster."""


def _kernel_applies(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and weight.dim() == 2 and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype and weight.device.type == "cpu" and (bias is None or bias.dtype == x.dtype)
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing() and not torch.is_autocast_enabled("cpu")
            and cpu_kernel.autograd_modes_supported() and cpu_kernel.load())


def sparse_input_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, max_density: float = MAX_DENSITY) -> Tensor:
    """``x weightᵀ + bias``: ``x [B, K]``, ``weight [N, K]``, ``bias [N]`` or None → ``[B, N]``, differentiable in
    all three; what ``F.linear`` computes, from the nonzeros of ``x`` where at most ``max_density`` of its values
    are nonzero (CPU, float32/float64).  Raises what ``F.linear`` raises for shapes that do not fit."""
    if (not _kernel_applies(x, weight, bias) or x.shape[1] != weight.shape[1] or x.layout != torch.strided
            or (bias is not None and tuple(bias.shape) != (weight.shape[0],))):
        return F.linear(x, weight, bias)  # also its errors and broadcasts
    return torch.ops.vaekit.sparse_input_linear(x, weight, bias, float(max_density))
