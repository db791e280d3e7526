"""Built-in priors: ``gaussian`` (VAE) and ``none`` (deterministic autoencoder)."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent, Normal

from .. import hookimpl
from ..interfaces import Prior
from ..ops import reparameterize_kl


class GaussianPrior(Prior):
    """Standard normal prior p(z) = N(0, I) with a diagonal-Gaussian posterior (Kingma & Welling 2014).

    The posterior head outputs ``[μ, log σ²]`` (``[B, 2d]``); a sample is
    ``z = μ + σ ⊙ ε`` and ``KL = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)`` nats,
    both from :func:`vaekit.ops.reparameterize_kl`.

    :param logvar_min: lower clamp of log σ² (stabilises early training).
    :param logvar_max: upper clamp of log σ².
    """

    def __init__(self, latent_dim, *, logvar_min: float = -30.0, logvar_max: float = 20.0):
        super().__init__(latent_dim)
        self.param_dim = 2 * self.latent_dim
        self.logvar_min = float(logvar_min)
        self.logvar_max = float(logvar_max)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``params [B, 2d] -> (μ [B, d], log σ² [B, d])``."""
        mu, logvar = params.chunk(2, dim=-1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def posterior(self, params: torch.Tensor) -> Distribution:
        mu, logvar = self.split(params)
        return Independent(Normal(mu, torch.exp(0.5 * logvar), validate_args=False), 1, validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.split(params)[0]

    def distribution(self) -> Distribution:
        zeros = self._device_anchor.new_zeros(self.latent_dim)
        return Independent(Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False)

    def rsample_kl(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.split(params)
        return reparameterize_kl(mu, logvar)


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
