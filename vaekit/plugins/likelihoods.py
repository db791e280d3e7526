"""Built-in likelihoods: ``bernoulli`` and ``gaussian``."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.distributions import Bernoulli, Distribution, Independent, Normal

from .. import hookimpl
from ..errors import ConfigError, DataError
from ..interfaces import Likelihood
from ..ops.bernoulli import bernoulli_log_prob


class BernoulliLikelihood(Likelihood):
    """Bernoulli p(x|z) from logits: ``log p = Σ_j x_j log p_j + (1 − x_j) log(1 − p_j)``.

    Computed from the decoder's logits with the numerically stable
    ``binary_cross_entropy_with_logits`` (via ``torch.distributions.Bernoulli``).
    Data must lie in [0, 1]; non-binary values are allowed (the cross-entropy
    of grey levels), though the figure is then not a normalised log-density.
    Its mean is ``sigmoid(logits)``.  Source: Kingma & Welling 2014, "Auto-Encoding
    Variational Bayes", appendix C.1.
    """

    default_binarize = "dynamic"

    def __init__(self, data_shape):
        super().__init__(data_shape)

    def distribution(self, params: torch.Tensor) -> Distribution:
        return Independent(Bernoulli(logits=params, validate_args=False), len(self.data_shape), validate_args=False)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` ``[...]`` nats, summed over the data dimensions: what
        ``Independent(Bernoulli(logits=params)).log_prob(x)`` computes (broadcasting ``params`` and ``x``),
        fused on the CPU (:func:`vaekit.ops.bernoulli.bernoulli_log_prob`: one pass over the pixels each
        way)."""
        return bernoulli_log_prob(params, x, len(self.data_shape))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def normalized_for(self, x: torch.Tensor) -> bool:
        """A density only for binary data: on grey levels (``--binarize none``) ``log_prob`` is a
        cross-entropy, and evaluation reports it as a loss, not as an ELBO or NLL."""
        return bool(((x == 0) | (x == 1)).all())

    def check_data(self, x: torch.Tensor, what: str) -> None:
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(
                f"the bernoulli likelihood needs {what} in [0, 1], but it ranges over [{lo:g}, {hi:g}]; "
                "rescale the data or use --likelihood gaussian"
            )


class GaussianLikelihood(Likelihood):
    """Gaussian p(x|z) = N(x; μ(z), σ²) per pixel; the decoder outputs μ.

    ``log p = −Σ_j [ (x_j − μ_j)² / 2σ_j² + log σ_j + ½ log 2π ]`` nats.  With a
    fixed σ this is squared error up to constants, and σ is used exactly as given.  With
    ``learn_sigma`` each data dimension learns its own σ_j = min_sigma + softplus(ρ_j), which
    stays above ``min_sigma`` and never loses its gradient (dσ_j/dρ_j = sigmoid(ρ_j) > 0; near
    the floor it shrinks like σ_j − min_sigma, which Adam's normalised steps make up for, while
    a clamp gave exactly 0); ρ_j starts where σ_j = ``sigma``.  Source: Kingma & Welling 2014, appendix C.2 (there σ comes from
    the decoder; here it is fixed or learned per pixel).

    The state dict holds ``fixed_sigma`` (σ, a buffer of shape ``S``) when σ is fixed, or
    ``raw_sigma`` (ρ, a parameter of shape ``S``) when it is learned.

    Raises ConfigError if ``sigma`` or ``min_sigma`` is not > 0, or if a learned σ would
    start at or below its floor (``sigma <= min_sigma``).

    :param sigma: the fixed σ, or the initial σ when learned (data units).
    :param learn_sigma: learn one σ per data dimension.
    :param min_sigma: floor of a learned σ, in data units (keeps constant pixels from diverging); a fixed σ ignores it.
    """

    def __init__(self, data_shape, *, sigma: float = 0.1, learn_sigma: bool = False, min_sigma: float = 0.01):
        super().__init__(data_shape)
        if not (0 < sigma < math.inf and 0 < min_sigma < math.inf):
            raise ConfigError(f"gaussian likelihood: sigma and min_sigma must be finite and > 0, got {sigma} and {min_sigma}")
        self.learn_sigma = bool(learn_sigma)
        self.min_sigma = float(min_sigma)
        if self.learn_sigma:
            if sigma <= min_sigma:
                raise ConfigError(
                    f"gaussian likelihood: a learned sigma starts at sigma={sigma:g}, which must be above its floor "
                    f"min_sigma={min_sigma:g}; raise sigma or lower min_sigma"
                )
            # ρ = softplus⁻¹(σ − min_sigma), written y + log(1 − e^(−y)) so it is exact for small and large y
            y = float(sigma) - self.min_sigma
            self.raw_sigma = nn.Parameter(torch.full(self.data_shape, y + math.log(-math.expm1(-y))))
        else:
            self.register_buffer("fixed_sigma", torch.full(self.data_shape, float(sigma)))

    def sigma(self) -> torch.Tensor:
        """Per-dimension σ, shape ``S``, in data units."""
        if self.learn_sigma:
            return self.min_sigma + F.softplus(self.raw_sigma)
        return self.fixed_sigma

    def distribution(self, params: torch.Tensor) -> Distribution:
        scale = self.sigma().expand_as(params)
        return Independent(Normal(params, scale, validate_args=False), len(self.data_shape), validate_args=False)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


class MCCLikelihood(Likelihood):
    """Maximum correntropy criterion (Qi et al., ICASSP 2014): a robust reconstruction loss, not a density.

    ``loss = −Σ_k K_σ(x_k − x̂_k)`` with the Gaussian kernel
    ``K_σ(a) = exp(−a² / 2σ²) / (√(2π) σ)``, summed over data dimensions; ``x̂`` is the
    decoder's output.  Large errors (outliers) saturate the kernel and stop pulling on the
    model, so MCC ignores corrupted training samples that squared error would fit.  The
    "log-likelihood" this plugin reports is ``Σ_k K_σ(x_k − x̂_k)``: it is not normalised, so
    ELBO and NLL are not defined for it and evaluation reports ``loss_recon`` instead.

    :param sigma: kernel width σ, in data units.
    """

    normalized = False

    def __init__(self, data_shape, *, sigma: float = 0.5):
        super().__init__(data_shape)
        if sigma <= 0:
            raise ConfigError(f"mcc likelihood: sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def distribution(self, params: torch.Tensor) -> Distribution:
        raise NotImplementedError("the mcc likelihood is a robust loss, not a distribution")

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = (x - params).flatten(1)
        kernel = torch.exp(-a.square() / (2 * self.sigma**2)) / (math.sqrt(2 * math.pi) * self.sigma)
        return kernel.sum(1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params


@hookimpl
def vaekit_register_likelihoods(registry):
    registry.register("bernoulli", BernoulliLikelihood)
    registry.register("gaussian", GaussianLikelihood)
    registry.register("mcc", MCCLikelihood)
