"""Eager reference formulas for the diagonal-Gaussian posterior (Kingma & Welling 2014, App. B)."""

from __future__ import annotations

import torch


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)``.

    mu, logvar: ``[..., d]``; returns ``[...]`` in nats (summed over ``d``).
    """
    return 0.5 * (logvar.exp() + mu.square() - 1.0 - logvar).sum(-1)


def reparameterize_kl(
    mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised sample and KL to the standard normal.

    mu, logvar: ``[..., d]`` (same shape and dtype); eps: ``[..., d]`` standard
    normal noise, drawn from the global torch RNG when None (seed with
    ``torch.manual_seed``).  Returns ``z [..., d]`` and ``kl [...]`` (nats).

    Raises ValueError if the shapes or dtypes of ``mu`` and ``logvar`` differ.
    """
    if mu.shape != logvar.shape or mu.dtype != logvar.dtype:
        raise ValueError(
            f"mu and logvar must match: mu {tuple(mu.shape)} {mu.dtype}, logvar {tuple(logvar.shape)} {logvar.dtype}"
        )
    if eps is None:
        eps = torch.randn_like(mu)
    z = mu + torch.exp(0.5 * logvar) * eps
    return z, gaussian_kl(mu, logvar)
