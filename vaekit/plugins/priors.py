"""Built-in priors: ``gaussian`` (VAE) and ``none`` (deterministic autoencoder)."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent, Normal

from .. import hookimpl
from ..interfaces import Prior, standard_normal
from ..ops import clamp_logvar, reparameterize_kl, reparameterize_kl_eager


class GaussianPrior(Prior):
    """Standard normal prior p(z) = N(0, I) with a diagonal-Gaussian posterior (Kingma & Welling 2014).

    The posterior head outputs ``[μ, log σ²]`` (``[B, 2d]``); a sample is
    ``z = μ + σ ⊙ ε`` and ``KL = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)`` nats, both from the fused
    op :func:`vaekit.ops.reparameterize_kl` (one kernel forward and one backward), or from the
    unfused eager formula with ``fused=false`` (``vaekit run --no-fused-op``); both draw ε from
    the same random stream.  log σ² is clamped as in :mod:`vaekit.ops.reference` (the same
    bounds and straight-through gradient for the fused op, the eager formula and :meth:`posterior`).

    :param fused: use the fused reparameterize + KL op.
    """

    def __init__(self, latent_dim, *, fused: bool = True):
        super().__init__(latent_dim)
        self.param_dim = 2 * self.latent_dim
        self.fused = bool(fused)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``params [B, 2d] -> (μ [B, d], log σ² [B, d])``."""
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar

    def posterior(self, params: torch.Tensor) -> Distribution:
        mu, logvar = self.split(params)
        std = torch.exp(0.5 * clamp_logvar(logvar))
        return Independent(Normal(mu, std, validate_args=False), 1, validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.split(params)[0]

    def distribution(self) -> Distribution:
        return standard_normal(self.latent_dim, self._device_anchor)

    def rsample_kl(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.split(params)
        if self.fused:
            return reparameterize_kl(mu, logvar)
        return reparameterize_kl_eager(mu, logvar, torch.randn_like(mu))


class NoPrior(Prior):
    """No prior: a deterministic autoencoder. The head outputs the code ``z [B, d]``; KL is 0.

    There is no distribution to sample from, so sampling and the
    importance-sampled NLL are unavailable.
    """

    stochastic = False

    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.param_dim = self.latent_dim

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params

    def rsample_kl(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return params, params.new_zeros(params.shape[:-1])


@hookimpl
def vaekit_register_priors(registry):
    registry.register("gaussian", GaussianPrior)
    registry.register("none", NoPrior)
