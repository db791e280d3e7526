"""``vaekit::bernoulli_philox``: Bernoulli draws from a counter-based generator, keyed by a seed.

Dynamic binarization (Salakhutdinov & Murray 2008) draws a fresh Bernoulli(x) per pixel of every
batch.  Drawing the uniforms from a sequential generator (torch's Mersenne Twister, one thread) and
comparing took about 0.5 ms for a batch of 128 MNIST digits on this project's 2-core machine, about
a tenth of a 784-400-20 VAE's training step; a counter-based generator computes any draw from
``(seed, index)`` alone, so the draws are vectorised, spread over threads (about 0.1 ms for that
batch) and independent of how a batch is split (across threads, or across torchrun ranks that each
binarize their rows of a global batch).

The generator is Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy
as 1, 2, 3"; checked against the known-answer vectors of Random123's ``tests/kat_vectors``).  Element
``i`` of a call (its flat index plus ``offset``) reads

* block ``b = 8·⌊i/32⌋ + (i mod 8)``: counter ``(b mod 2³², ⌊b/2³²⌋, 0, 0)``, key ``(seed mod 2³²,
  ⌊seed/2³²⌋)``;
* its word ``⌊i/8⌋ mod 4`` of the block's four, ``w``; the uniform ``u_i = ⌊w/256⌋ · 2⁻²⁴`` (24 bits,
  in ``[0, 1 − 2⁻²⁴]``, exact in float32);

and is 1 where ``u_i < p_i``, so ``P(1) = ⌈p·2²⁴⌉/2²⁴`` (p = 0 never draws 1, p = 1 always does).
32 consecutive elements take the 4 words of 8 consecutive blocks: one AVX2 register of 8 blocks per
word.  The CPU kernel is C++ (``csrc/bernoulli_philox.cpp``, AVX2 where the CPU has it, threads from
``at::parallel_for``); the CUDA kernel is Triton's (:mod:`vaekit.ops.philox_triton`, one launch a
batch); :func:`bernoulli_philox_eager` computes the same draws with torch operations on any device
(the reference both kernels are tested against bit for bit, and the implementation where there is no
kernel).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_BITS = 62
"""Seeds drawn for :func:`bernoulli_philox` are in ``[0, 2**62)`` (any 64-bit key works; this keeps them
non-negative int64)."""


def _mulhilo(m: int, a: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``m · a`` for ``a`` int64 in [0, 2³²): in 16-bit halves of ``m``, so no
    product exceeds 2⁴⁸ (int64 arithmetic, any device)."""
    p1, p0 = a * (m >> 16), a * (m & 0xFFFF)
    return (p1 + (p0 >> 16)) >> 16, (((p1 & 0xFFFF) << 16) + p0) & MASK32


def philox4x32(counter: Tensor, key: tuple[int, int]) -> Tensor:
    """Philox4x32-10 of ``counter [..., 4]`` (int64 words in [0, 2³²)) with ``key`` (two 32-bit words):
    ``[..., 4]`` int64 words, Random123's ``philox4x32_R(10, ctr, key)``."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key
    for r in range(ROUNDS):
        hi0, lo0 = _mulhilo(M0, c0)
        hi1, lo1 = _mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return torch.stack([c0, c1, c2, c3], dim=-1)


def philox_uniform(n: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """The uniforms ``u [n]`` (float32) of elements ``offset … offset + n − 1`` (the module's mapping): each
    group of 32 elements is the 4 words of its 8 blocks, word-major, so each block is computed once."""
    g0, g1 = offset // 32, (offset + n + 31) // 32  # the groups of 32 elements touched
    block = 8 * torch.arange(g0, g1, device=device, dtype=torch.int64).unsqueeze(1) + torch.arange(8, device=device)
    zeros = torch.zeros_like(block)
    words = philox4x32(torch.stack([block & MASK32, block >> 32, zeros, zeros], dim=-1), (seed & MASK32, (seed >> 32) & MASK32))
    flat = words.transpose(1, 2).reshape(-1)  # [group, word, block]: element 32g + 8q + j is word q of block 8g + j
    start = offset - 32 * g0
    return (flat[start:start + n] >> 8).to(torch.float32) * 2.0**-24


def _compare_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bernoulli_philox_eager(p: Tensor, seed: int, offset: int = 0) -> Tensor:
    """:func:`bernoulli_philox` in torch operations, on ``p``'s device."""
    u = philox_uniform(p.numel(), seed, offset, p.device).view(p.shape)
    return (u.to(_compare_dtype(p.dtype)) < p.to(_compare_dtype(p.dtype))).to(p.dtype)


@torch.library.custom_op("vaekit::bernoulli_philox", mutates_args=())
def _op(p: Tensor, seed: int, offset: int) -> Tensor:
    """Default implementation (devices without a kernel, no C++ compiler, CUDA without triton): the eager formula."""
    return bernoulli_philox_eager(p, seed, offset)


@_op.register_fake
def _(p: Tensor, seed: int, offset: int) -> Tensor:
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def _register_triton() -> bool:
    """The CUDA kernel (:mod:`vaekit.ops.philox_triton`); without triton CUDA keeps the eager formula."""
    try:
        from . import philox_triton
    except Exception:  # noqa: BLE001 - no triton: CUDA uses the default implementation
        return False

    @_op.register_kernel("cuda")  # launched directly: the op is opaque to torch.compile, its inputs real tensors
    def _(p: Tensor, seed: int, offset: int) -> Tensor:
        return philox_triton.bernoulli_philox(p, seed, offset)

    return True


TRITON_REGISTERED = torch.cuda.is_available() and _register_triton()

_OP = torch.ops.vaekit.bernoulli_philox.default


def bernoulli_philox(p: Tensor, seed: int, offset: int = 0) -> Tensor:
    """One Bernoulli draw per element of the probabilities ``p [...]`` (any shape, floating point, values
    in [0, 1]): 0/1 in ``p``'s dtype, the same for the same ``(seed, offset)`` on every device, thread count
    and split of the elements: ``bernoulli_philox(p, s, k)[j] == bernoulli_philox(p', s, k + j)[0]``
    where ``p'[0] == p[j]`` (flat indices).  ``seed``: an int in [0, 2⁶⁴) or a negative int64 (its two's
    complement); ``offset``: the global index of ``p``'s first element, ≥ 0.  Float16/bfloat16 ``p`` is
    compared in float32.  The draws are constants to autograd (no gradient flows to ``p``).  The module
    docstring gives the generator and the mapping.

    Raises ValueError for a non-floating ``p``, a negative ``offset`` (or one past 2⁶³ − ``p.numel()``) or a
    seed outside ``[−2⁶³, 2⁶⁴)``.
    """
    if not p.dtype.is_floating_point:
        raise ValueError(f"bernoulli_philox needs floating-point probabilities, got {p.dtype}")
    if offset < 0 or offset + p.numel() > 1 << 63:
        raise ValueError(f"offset must be >= 0 and offset + p.numel() at most 2**63, got {offset}")
    if not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"seed must be in [-2**63, 2**64), got {seed}")
    seed = seed - (1 << 64) if seed >= 1 << 63 else seed  # the schema's int is int64: the same 64 bits
    if p.device.type == "cpu" and not torch.compiler.is_compiling():
        cpu_kernel.load()  # registers the C++ kernel before the op's first CPU call
    p = p.detach()  # constants on every device (the CPU's C++ autograd kernel draws them so too)
    if p.dtype in (torch.float16, torch.bfloat16):
        return _OP(p.float(), seed, offset).to(p.dtype)
    return _OP(p, seed, offset)


def draw_seeds(generator: torch.Generator, n: int) -> list[int]:
    """``n`` seeds for :func:`bernoulli_philox` in ``[0, 2**62)``, drawn from ``generator`` (a CPU generator)
    in one call and read in one transfer."""
    return torch.randint(0, 1 << SEED_BITS, (n,), generator=generator).tolist()
