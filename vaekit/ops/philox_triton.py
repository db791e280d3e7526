"""Triton kernel of ``vaekit::bernoulli_philox`` for CUDA devices (also runnable on the CPU with
``TRITON_INTERPRET=1``).

The same draws as the C++ kernel and the eager formula of :mod:`vaekit.ops.philox` (element ``i``:
block ``8·⌊i/32⌋ + (i mod 8)``, counter ``(block mod 2³², ⌊block/2³²⌋, 0, 0)``, key the seed's two
32-bit halves, word ``⌊i/8⌋ mod 4``, ``u = ⌊w/256⌋·2⁻²⁴``, draw ``u < p``) in one kernel launch: each
program draws ``BLOCK`` elements with Triton's ``tl.philox`` (Philox4x32-10, Random123's rounds and
constants), so a batch is binarized without the eager formula's ~100 small kernels.  Each element
computes its own block (four times the rounds of the eager formula, which shares a block between
four elements; on a GPU the launch count, not the arithmetic, is what costs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bernoulli_philox_kernel(p_ptr, out_ptr, n, offset, seed, BLOCK: tl.constexpr, CMP: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # this call's elements
    mask = j < n
    i = j + offset  # the global index
    block = 8 * (i // 32) + i % 8
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, zero, zero, 10)
    q = (i // 8) % 4
    w = tl.where(q == 0, w0, tl.where(q == 1, w1, tl.where(q == 2, w2, w3)))
    u = (w >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2**-24: 24 bits, exact in float32
    p = tl.load(p_ptr + j, mask=mask, other=0.0).to(CMP)
    tl.store(out_ptr + j, (u.to(CMP) < p).to(out_ptr.dtype.element_ty), mask=mask)


KERNELS = (_bernoulli_philox_kernel,)  # every @triton.jit entry point (compiled offline in the tests)
SCALAR_TYPES = {"n": "i64", "offset": "i64", "seed": "i64"}  # runtime scalars that are not int32 (the offline compile)
COMPILE_DTYPES = (torch.float32, torch.float64)  # what the op launches it with (half precision is compared in float32)
BLOCK = 1024


def constexprs(dtype: torch.dtype, d: int = 0) -> dict:
    """The kernel's compile-time arguments for probabilities of ``dtype`` (``d`` is unused: one layout)."""
    return {"BLOCK": BLOCK, "CMP": tl.float64 if dtype == torch.float64 else tl.float32}


def bernoulli_philox(p: torch.Tensor, seed: int, offset: int, launch=None) -> torch.Tensor:
    """:func:`vaekit.ops.philox.bernoulli_philox` of ``p`` (any shape; read contiguous) with ``seed`` an int64
    (the 64 key bits in two's complement) and ``offset`` ≥ 0; 0/1 in ``p``'s dtype.  ``launch`` wraps the
    kernel (e.g. ``torch.library.wrap_triton``, for a caller that torch.compile traces); by default it is
    launched directly, as the op's CUDA kernel does."""
    pc = p.contiguous()
    out = torch.empty_like(pc)
    n = pc.numel()
    if n:
        kernel = (launch or (lambda k: k))(_bernoulli_philox_kernel)
        kernel[(triton.cdiv(n, BLOCK),)](pc, out, n, offset, seed, **constexprs(p.dtype))
    return out
