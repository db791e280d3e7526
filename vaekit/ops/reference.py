"""Eager reference formulas for the diagonal-Gaussian posterior (Kingma & Welling 2014, appendix B).

These are the oracle the fused op is tested against, and its fallback on devices without a
kernel of their own.  log σ² is clamped to [LOGVAR_MIN, LOGVAR_MAX] before exponentiating, so
values far outside ±30 neither overflow nor turn gradients into NaN (see
:func:`vaekit.ops.reparameterize_kl` for how the fused op treats the clamp's gradient).
"""

from __future__ import annotations

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 30.0


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)``.

    mu, logvar: ``[..., d]``; returns ``[...]`` in nats (summed over ``d``).
    """
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(-1)


def reparameterize_kl_eager(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused formula, differentiable by autograd: ``z = μ + exp(½ log σ²) ⊙ ε`` and the KL, with log σ² clamped.

    mu, logvar, eps: ``[..., d]``; returns ``z [..., d]`` and ``kl [...]`` (nats).  Half-precision
    inputs are computed in float32 and cast back.
    """
    dtype = mu.dtype
    if dtype in (torch.float16, torch.bfloat16):
        mu, logvar, eps = mu.float(), logvar.float(), eps.float()
    lv = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
    std = torch.exp(0.5 * lv)
    z = mu + std * eps
    kl = 0.5 * (std.square() + mu.square() - 1.0 - lv).sum(-1)
    return z.to(dtype), kl.to(dtype)


def reparameterize_kl_backward_eager(
    grad_z: torch.Tensor, grad_kl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused op's gradients in plain tensor ops (straight through the clamp).

    ``∂/∂μ = grad_z + grad_kl·μ``; ``∂/∂log σ² = ½ (grad_z·σ·ε + grad_kl·(σ² − 1))`` with σ from the
    clamped log σ².  Differentiable, so it also serves double backward.
    """
    dtype = mu.dtype
    if dtype in (torch.float16, torch.bfloat16):
        grad_z, grad_kl, mu, logvar, eps = (t.float() for t in (grad_z, grad_kl, mu, logvar, eps))
    std = torch.exp(0.5 * logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))
    g = grad_kl.unsqueeze(-1)
    grad_mu = grad_z + g * mu
    grad_logvar = 0.5 * (grad_z * std * eps + g * (std.square() - 1.0))
    return grad_mu.to(dtype), grad_logvar.to(dtype)
