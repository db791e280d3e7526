"""Triton kernels of the fused op for CUDA devices (also runnable on the CPU with ``TRITON_INTERPRET=1``).

One program per row of ``[rows, d]``: the forward pass reads μ, log σ², ε once, writes z and
accumulates the KL row sum in float32 (float64 for float64 inputs); the backward pass reads the
same inputs and the two incoming gradients once and writes both input gradients.  Clamp bounds,
compute type and the straight-through gradient follow :mod:`vaekit.ops.reference`; the bounds
reach the kernels as ``tl.constexpr`` arguments (Triton's compiler rejects plain module globals).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import compute_dtype, logvar_bounds


@triton.jit
def _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, ACC: tl.constexpr, LV_MIN: tl.constexpr,
                 LV_MAX: tl.constexpr):
    """μ, clamped log σ², ε and σ = exp(½ log σ²) for one block of a row, in the accumulation type."""
    m = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(ACC)
    e = tl.load(eps_ptr + offs, mask=mask, other=0.0).to(ACC)
    lv = tl.minimum(tl.maximum(lv, LV_MIN), LV_MAX)
    return m, lv, e, tl.exp(0.5 * lv)


@triton.jit
def _forward_kernel(mu_ptr, lv_ptr, eps_ptr, z_ptr, kl_ptr, d, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                    LV_MIN: tl.constexpr, LV_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < d
        offs = row * d + cols
        m, lv, e, s = _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, ACC, LV_MIN, LV_MAX)
        tl.store(z_ptr + offs, (m + s * e).to(z_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, s * s + m * m - 1.0 - lv, 0.0)
    tl.store(kl_ptr + row, (0.5 * tl.sum(acc, axis=0)).to(kl_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(gz_ptr, gkl_ptr, mu_ptr, lv_ptr, eps_ptr, gmu_ptr, glv_ptr, d,
                     BLOCK_D: tl.constexpr, ACC: tl.constexpr, LV_MIN: tl.constexpr, LV_MAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(gkl_ptr + row).to(ACC)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        mask = cols < d
        offs = row * d + cols
        m, lv, e, s = _load_inputs(mu_ptr, lv_ptr, eps_ptr, offs, mask, ACC, LV_MIN, LV_MAX)
        gz = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(gmu_ptr + offs, (gz + g * m).to(gmu_ptr.dtype.element_ty), mask=mask)
        tl.store(glv_ptr + offs, (0.5 * (gz * s * e + g * (s * s - 1.0))).to(glv_ptr.dtype.element_ty), mask=mask)


KERNELS = (_forward_kernel, _backward_kernel)  # every @triton.jit entry point (compiled offline in the tests)


def _block(d: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(d, 1))))


def constexprs(dtype: torch.dtype, d: int) -> dict:
    """The compile-time arguments of both kernels for inputs of ``dtype`` with rows of length ``d``."""
    lo, hi = logvar_bounds(dtype)
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return {"BLOCK_D": _block(d), "ACC": acc, "LV_MIN": lo, "LV_MAX": hi}


def forward(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, d]`` contiguous inputs -> ``(z [rows, d], kl [rows])`` (kl in float32 for half inputs).

    ``launch`` wraps the kernel (e.g. ``torch.library.wrap_triton``, for a caller that torch.compile traces);
    by default it is launched directly, as the op's CUDA kernel does.
    """
    rows, d = mu.shape
    z = torch.empty_like(mu)
    kl = mu.new_empty(rows, dtype=compute_dtype(mu.dtype))
    if rows:
        kernel = (launch or (lambda k: k))(_forward_kernel)
        kernel[(rows,)](mu, logvar, eps, z, kl, d, **constexprs(mu.dtype, d))
    return z, kl


def backward(grad_z, grad_kl, mu, logvar, eps, launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[rows, d]`` contiguous inputs and ``grad_kl [rows]`` -> ``(grad_mu, grad_logvar)``."""
    rows, d = mu.shape
    gmu = torch.empty_like(mu)
    glv = torch.empty_like(mu)
    if rows:
        kernel = (launch or (lambda k: k))(_backward_kernel)
        kernel[(rows,)](grad_z, grad_kl, mu, logvar, eps, gmu, glv, d, **constexprs(mu.dtype, d))
    return gmu, glv
