"""Built-in priors: ``gaussian`` (VAE) and ``none`` (deterministic autoencoder)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal

from .. import hookimpl
from ..errors import ConfigError
from ..interfaces import Prior, standard_normal
from ..ops import clamp_logvar, logvar_bounds, reparameterize_kl, reparameterize_kl_eager
from ..ops.reference import compute_dtype


class GaussianPrior(Prior):
    """Standard normal prior p(z) = N(0, I) with a Gaussian posterior, diagonal (Kingma & Welling 2014) or
    full-covariance (Kingma & Welling 2019, "An Introduction to VAEs", §2.5.5).

    **Diagonal** (``covariance=diagonal``, the default): the posterior head outputs ``[μ, log σ²]``
    (``[B, 2d]``); a sample is ``z = μ + σ ⊙ ε`` and ``KL = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)`` nats,
    both from the fused op :func:`vaekit.ops.reparameterize_kl` (one kernel forward and one backward),
    or from the unfused eager formula with ``fused=false`` (``vaekit run --no-fused-op``); both draw ε
    from the same random stream.  log σ² is clamped as in :mod:`vaekit.ops.reference` (the same
    bounds and straight-through gradient for the fused op, the eager formula and :meth:`posterior`).

    **Full covariance** (``covariance=full``, ``vaekit run --prior gaussian:covariance=full``): the head
    outputs ``[μ, log σ², L′]`` (``[B, 2d + d(d−1)/2]``): μ ``[B, d]``, the log of the squared diagonal
    of the Cholesky factor ``[B, d]`` (clamped like the diagonal posterior's log σ², bounds and
    straight-through gradient of :func:`vaekit.ops.clamp_logvar`, so ``L_ii = σ_i = exp(½ log σ_i²) > 0``)
    and its ``d(d−1)/2`` strictly-lower entries in row-major order (``torch.tril_indices(d, d, −1)``:
    ``L_10, L_20, L_21, L_30, …``).  ``L = L_mask ⊙ L′ + diag(σ)``, q(z|x) = N(μ, LLᵀ), a sample is
    ``z = μ + Lε`` with ε ~ N(0, I) ``[B, d]`` drawn from torch's global RNG (``randn_like(μ)``, the
    diagonal posterior's stream: with L′ = 0 both give the same z and KL), and
    ``KL = ½ (tr(LLᵀ) + μᵀμ − d − 2 Σ_i log L_ii)`` nats ``[B]``, summed over d.  :meth:`posterior` is
    ``MultivariateNormal(loc=μ, scale_tril=L)`` (batch ``[B]``, event ``[d]``).  Computed with plain
    tensor ops (no fused op; ``fused`` is ignored), float16/bfloat16 in float32 as the fused op does.
    An exported model's ``encode`` returns μ and the log of the marginal variances
    ``log diag(LLᵀ)`` (:meth:`export_marginals`); the correlations are not exported.

    Raises ConfigError for a ``covariance`` other than ``diagonal`` or ``full``.

    :param fused: use the fused reparameterize + KL op (diagonal covariance).
    :param covariance: the posterior's covariance: ``diagonal`` (σ²) or ``full`` (LLᵀ, Cholesky factor L).
    """

    def __init__(self, latent_dim, *, fused: bool = True, covariance: Literal["diagonal", "full"] = "diagonal"):
        super().__init__(latent_dim)
        if covariance not in ("diagonal", "full"):
            raise ConfigError(f"prior 'gaussian': covariance must be 'diagonal' or 'full', got {covariance!r}")
        self.covariance = covariance
        d = self.latent_dim
        self.param_dim = 2 * d + (d * (d - 1) // 2 if covariance == "full" else 0)
        self.fused = bool(fused)

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``params [B, P] -> (μ [B, d], log σ² [B, d])`` (the diagonal of L for a full covariance)."""
        d = self.latent_dim
        return params[..., :d], params[..., d : 2 * d]

    def _factors(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(μ [B, d], clamped log σ² [B, d], L [B, d, d])`` in the compute dtype (float32 for half inputs)."""
        dtype = params.dtype
        params = params.to(compute_dtype(dtype))
        mu, logvar = self.split(params)
        logvar = clamp_logvar(logvar, dtype)
        return mu, logvar, _scale_tril(torch.exp(0.5 * logvar), params[..., 2 * self.latent_dim :])

    def scale_tril(self, params: torch.Tensor) -> torch.Tensor:
        """The posterior's Cholesky factor ``L [B, d, d]`` (lower triangular, ``L_ii = σ_i > 0``) from
        ``params [B, P]``, in the compute dtype (float32 for half inputs); ``diag(σ)`` for a diagonal
        covariance.  log σ² is clamped with :func:`vaekit.ops.clamp_logvar` (straight-through gradient)."""
        return self._factors(params)[2]

    def posterior(self, params: torch.Tensor) -> Distribution:
        if self.covariance == "full":
            mu, _, L = self._factors(params)
            return MultivariateNormal(mu, scale_tril=L, validate_args=False)
        mu, logvar = self.split(params)
        std = torch.exp(0.5 * clamp_logvar(logvar))
        return Independent(Normal(mu, std, validate_args=False), 1, validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return self.split(params)[0]

    def distribution(self) -> Distribution:
        return standard_normal(self.latent_dim, self._device_anchor)

    def rsample_kl(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.split(params)
        if self.covariance == "full":
            return self.rsample_kl_full(params, torch.randn_like(mu))
        if self.fused:
            return reparameterize_kl(mu, logvar)
        return reparameterize_kl_eager(mu, logvar, torch.randn_like(mu))

    def rsample_kl_full(self, params: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-covariance sample ``z = μ + Lε`` ``[B, d]`` (dtype of ``params``) for given noise
        ``eps [B, d]`` and ``KL = ½ (tr(LLᵀ) + μᵀμ − d − 2 Σ_i log L_ii)`` ``[B]`` nats (float32 for half
        inputs), differentiable w.r.t. ``params`` (what :meth:`rsample_kl` computes with ε ~ N(0, I))."""
        mu, logvar, L = self._factors(params)
        z = mu + (L * eps.to(mu.dtype).unsqueeze(-2)).sum(-1)  # L ε, elementwise (no half-precision matmul)
        kl = 0.5 * (L.square().sum((-2, -1)) + mu.square().sum(-1) - self.latent_dim - logvar.sum(-1))
        return z.to(params.dtype), kl

    def export_marginals(self) -> nn.Module:
        """A TorchScript-scriptable module ``params [B, P] -> [μ, log σ²] [B, 2d]``: μ and the log of the
        posterior's marginal variances ``diag(LLᵀ)`` (for a diagonal covariance, the head's output as
        is).  :mod:`vaekit.export` writes what it returns as an exported ``encode``'s ``(mu, logvar)``."""
        return _Marginals(self.latent_dim, self.covariance == "full")


def _scale_tril(std: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """``L = diag(std) + L_mask ⊙ L′`` ``[..., d, d]`` from ``std [..., d]`` and the strictly-lower entries
    ``off [..., d(d−1)/2]`` in the order of ``torch.tril_indices(d, d, −1)`` (none: ``diag(std)``)."""
    d = std.shape[-1]
    L = torch.diag_embed(std)
    if off.shape[-1] == 0:
        return L
    rows, cols = torch.tril_indices(d, d, -1, device=std.device).unbind(0)
    return L.flatten(-2).index_copy(-1, rows * d + cols, off).view(list(std.shape[:-1]) + [d, d])


class _Marginals(nn.Module):
    """``[μ, log σ², L′] -> [μ, log diag(LLᵀ)]`` for export (see :meth:`GaussianPrior.export_marginals`)."""

    def __init__(self, latent_dim: int, full: bool) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.full = full
        self.lo, self.hi = logvar_bounds(torch.float32)  # export is float32: clamp_logvar's bounds

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        d = self.latent_dim
        if not self.full:
            return params
        mu = params[:, :d]
        std = torch.exp(0.5 * params[:, d : 2 * d].clamp(self.lo, self.hi))
        L = _scale_tril(std, params[:, 2 * d :])
        return torch.cat([mu, torch.log(L.square().sum(-1))], dim=-1)


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
