"""Eager reference formulas for the diagonal-Gaussian posterior (Kingma & Welling 2014, appendix B).

These are the oracle the fused op is tested against, and its fallback on devices without a
kernel of their own.  They define the one semantics every implementation follows (the C++ and
Triton kernels get their bounds from here):

* **compute type**: float16/bfloat16 inputs are computed in float32; ``z`` is rounded to the
  input dtype once at the end, the KL is returned in float32 (a sum of ``d`` terms can exceed
  float16's range even when every term fits).
* **clamp**: log σ² is clamped to :func:`logvar_bounds` (``[−30, 30]``; ``[−30, 11]`` for
  float16, where σ² = e¹¹ ≈ 6·10⁴ is the largest that fits the dtype), so neither σ, z nor the
  KL overflows, however far outside the range log σ² is.
* **gradient at the clamp: straight through.**  Values are computed at the clamped log σ², and
  the gradient w.r.t. log σ² is that of the unclamped formula evaluated there:
  ``∂KL/∂log σ² = ½(σ² − 1)``, ``∂z/∂log σ² = ½ σ ε`` with σ from the clamped value.  So a
  log σ² beyond the bound is still pulled back by the KL (a true clamp would give it gradient 0
  forever); the pull is finite and at most ``½ e^{hi}`` per unit of incoming KL gradient (in
  float16 that fits for an incoming gradient up to about 2; under autocast the op runs in float32).
"""

from __future__ import annotations

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 30.0
LOGVAR_MAX_FLOAT16 = 11.0  # log(65504) ≈ 11.09: σ² and ½σ² gradients fit float16
HALF_TYPES = (torch.float16, torch.bfloat16)


def logvar_bounds(dtype: torch.dtype) -> tuple[float, float]:
    """The clamp ``(lo, hi)`` applied to log σ² for inputs of ``dtype`` (see the module docstring)."""
    return LOGVAR_MIN, (LOGVAR_MAX_FLOAT16 if dtype == torch.float16 else LOGVAR_MAX)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the op computes in (and returns the KL in): float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in HALF_TYPES else dtype


def clamp_logvar(logvar: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """log σ² clamped to ``logvar_bounds(dtype or logvar.dtype)`` with a straight-through gradient.

    The value is ``logvar.clamp(lo, hi)``; the gradient is 1 everywhere (``∂/∂log σ²`` of the
    clamped value is taken as if no clamp were there).
    """
    lo, hi = logvar_bounds(dtype or logvar.dtype)
    return logvar + (logvar.clamp(lo, hi) - logvar).detach()


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)``, unclamped.

    mu, logvar: ``[..., d]``; returns ``[...]`` in nats (summed over ``d``).
    """
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(-1)


def _upcast(dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    target = compute_dtype(dtype)
    return tuple(t.to(target) for t in tensors)


def reparameterize_kl_eager(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused formula, differentiable by autograd: ``z = μ + exp(½ log σ²) ⊙ ε`` and the KL.

    mu, logvar, eps: ``[..., d]``; returns ``z [..., d]`` (dtype of ``mu``) and ``kl [...]``
    (nats; float32 for half inputs).  Clamp and gradients as in the module docstring, so its
    autograd gradients equal the fused op's.
    """
    dtype = mu.dtype
    mu, logvar, eps = _upcast(dtype, mu, logvar, eps)
    lv = clamp_logvar(logvar, dtype)
    std = torch.exp(0.5 * lv)
    z = mu + std * eps
    kl = 0.5 * (std.square() + mu.square() - 1.0 - lv).sum(-1)
    return z.to(dtype), kl


def reparameterize_kl_backward_eager(
    grad_z: torch.Tensor, grad_kl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's gradients in plain tensor ops.

    ``∂/∂μ = grad_z + grad_kl·μ``; ``∂/∂log σ² = ½ (grad_z·σ·ε + grad_kl·(σ² − 1))`` with σ from the
    clamped log σ² (straight through).  Returns ``(grad_mu, grad_logvar)`` in the dtype of ``mu``.
    Differentiable, so it also serves double backward.
    """
    dtype = mu.dtype
    grad_z, grad_kl, mu, logvar, eps = _upcast(dtype, grad_z, grad_kl, mu, logvar, eps)
    std = torch.exp(0.5 * clamp_logvar(logvar, dtype))
    g = grad_kl.unsqueeze(-1)
    grad_mu = grad_z + g * mu
    grad_logvar = 0.5 * (grad_z * std * eps + g * (std.square() - 1.0))
    return grad_mu.to(dtype), grad_logvar.to(dtype)


def reparameterize_grad_eps(grad_z: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``∂/∂ε = grad_z · σ`` with σ from the clamped log σ², computed in the compute dtype and
    returned in the dtype of ``logvar`` (``[..., d]``)."""
    dtype = logvar.dtype
    grad_z, logvar = _upcast(dtype, grad_z, logvar)
    return (grad_z * torch.exp(0.5 * clamp_logvar(logvar, dtype))).to(dtype)
