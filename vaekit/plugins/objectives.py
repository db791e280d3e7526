"""Built-in training objectives: ``elbo`` (β schedules, free bits) and ``iwae``."""

from __future__ import annotations

import math

import torch

from .. import hookimpl
from ..errors import ConfigError
from ..interfaces import Objective, StepOutput


class ELBO(Objective):
    """The evidence lower bound (Kingma & Welling 2014, eq. 10), with β, β annealing and free bits.

    Loss per batch: ``mean_B(−log p(x|z)) + β_e · KL`` nats, one z ~ q(z|x) per data point and the
    prior's KL (analytic where it has one).  ``β_e`` is the β in effect in epoch ``e`` (counting
    from 1), logged as ``beta`` every epoch:

    * constant ``β`` (Higgins et al. 2017) by default;
    * ``warmup=N``: ``β_e = β · min(1, (e − 1)/N)``, linear from 0 over the first N epochs
      (Bowman et al. 2016, KL annealing);
    * ``cycles=M``: cyclical annealing over the run's E epochs (Fu et al. 2019): with
      ``L = ceil(E/M)`` and ``τ = ((e − 1) mod L) / (E/M)``, ``β_e = β · min(1, τ/R)``, R = ``ratio``
      (β rises linearly over the first R of each cycle, then stays).  E is ``horizon``, by default
      the run's ``--epochs`` when it starts; config.json records it, so a run resumed to more
      epochs keeps its cycles (and goes on cycling with the same period after E).

    ``free_bits=λ`` (Kingma et al. 2016, IAF paper, "free bits") replaces the KL term by
    ``Σ_j max(λ, mean_B KL_j)`` over latent units j (λ in nats per unit): a unit whose mean KL is
    below λ gets no KL gradient.  It needs the prior's per-unit KL
    (``Prior.kl_per_unit``; the diagonal ``gaussian`` has it).  The logged
    ``kl`` stays the plain mean KL.  A deterministic autoencoder (prior ``none``) trains on the
    reconstruction term alone (and logs no ``beta``); free bits are refused there.

    :param beta: weight β of the KL term; unset: the run's ``--beta`` (default 1).
    :param warmup: epochs of linear KL warm-up from 0 to β (0: none).
    :param cycles: number of cyclical annealing cycles over the run's epochs (0: none).
    :param ratio: fraction R of each cycle over which β rises (with ``cycles``).
    :param free_bits: λ, nats per latent unit below which the KL is not penalised (0: off).
    :param horizon: epochs E the ``cycles`` span (unset: the run's ``--epochs`` at its start); at least
        2 epochs per cycle, since β changes once per epoch.
    """

    name = "elbo"

    def __init__(self, config, *, beta: float | None = None, warmup: int = 0, cycles: int = 0,
                 ratio: float = 0.5, free_bits: float = 0.0, horizon: int | None = None) -> None:
        super().__init__(config)
        if beta is not None and config.beta != 1.0 and beta != config.beta:
            raise ConfigError(f"β is set twice (--beta {config.beta:g} and elbo:beta={beta:g}); give one of them")
        self.beta = float(config.beta if beta is None else beta)
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ConfigError(f"elbo: beta must be a finite number >= 0, got {self.beta}")
        if warmup < 0 or cycles < 0:
            raise ConfigError(f"elbo: warmup and cycles must be >= 0, got warmup={warmup}, cycles={cycles}")
        if warmup and cycles:
            raise ConfigError("elbo: warmup and cycles are two β schedules; give one of them")
        if not 0 < ratio <= 1:
            raise ConfigError(f"elbo: ratio must be in (0, 1], got {ratio}")
        if not (math.isfinite(free_bits) and free_bits >= 0):
            raise ConfigError(f"elbo: free_bits must be a finite number of nats >= 0, got {free_bits}")
        self.warmup, self.cycles, self.ratio, self.free_bits = int(warmup), int(cycles), float(ratio), float(free_bits)
        if horizon is not None and horizon < 1:
            raise ConfigError(f"elbo: horizon must be at least 1 epoch, got {horizon}")
        if not cycles and (ratio != 0.5 or horizon is not None):
            raise ConfigError("elbo: ratio and horizon shape the cyclical schedule; give them with cycles=M")
        self.epochs = int(config.epochs if horizon is None else horizon)
        if cycles and self.epochs < 2 * cycles:
            raise ConfigError(f"elbo: cycles={cycles} over {self.epochs} epochs leaves less than 2 epochs per cycle "
                              "(β is set once per epoch, so it would never rise); use at most "
                              f"{max(1, self.epochs // 2)} cycles or more --epochs")
        self.current_beta = self.beta_at(1)
        self.stochastic = True

    def recorded_options(self, options: dict) -> dict:
        """The cycles' horizon is pinned to this run's epochs, so resuming to more epochs keeps the schedule."""
        if self.cycles and options.get("horizon") is None:
            return {**options, "horizon": self.epochs}
        return options

    def beta_at(self, epoch: int) -> float:
        """β in effect in ``epoch`` (counting from 1) under the schedule."""
        if self.warmup:
            return self.beta * min(1.0, (epoch - 1) / self.warmup)
        if self.cycles:
            period = self.epochs / self.cycles
            tau = ((epoch - 1) % math.ceil(period)) / period
            return self.beta * min(1.0, tau / self.ratio)
        return self.beta

    def bind(self, model) -> None:
        self.stochastic = model.prior.stochastic
        if self.free_bits and not self.stochastic:
            raise ConfigError("elbo: free_bits needs a posterior, but prior 'none' is a deterministic autoencoder")
        if self.free_bits:  # a prior without a per-unit KL says so now, before any training
            model.prior.kl_per_unit(model.prior._device_anchor.new_zeros(1, model.prior.param_dim))

    def set_epoch(self, epoch: int) -> dict[str, float]:
        self.current_beta = self.beta_at(epoch)
        return {"beta": self.current_beta} if self.stochastic else {}

    def free_bits_kl(self, model, record: StepOutput) -> torch.Tensor:
        """``Σ_j max(λ, mean_B KL_j)`` nats, from the prior's per-unit KL ``[B, d]``."""
        return model.prior.kl_per_unit(record.params).mean(0).clamp(min=self.free_bits).sum()

    def terms(self, model, record: StepOutput):
        kl = self.free_bits_kl(model, record) if self.free_bits and self.stochastic else None
        return model.elbo_terms(record, self.current_beta, kl)


class IWAE(Objective):
    """The importance-weighted bound (Burda et al. 2015, eq. 8) with k samples per data point.

    Loss per batch: ``−mean_B log (1/k) Σ_i p(x|z_i) p(z_i) / q(z_i|x)`` nats, ``z_i ~ q(z|x)``.
    The encoder runs once; the k draws come from the prior's ``rsample_kl`` (the fused
    reparameterize + KL op for ``gaussian``) on the posterior parameters repeated k times and are
    decoded in one batched pass of ``k·B`` rows (``VAEModel.forward(x, samples=k)``).  ``log q``
    and ``log p`` come from the prior's ``posterior`` and ``distribution``, so any stochastic prior
    works.  ``k = 1`` is the ELBO with a one-sample KL estimate; the bound tightens as k grows.
    Logged terms: ``iwae`` (the bound, nats), ``recon`` and ``kl`` (means over the k·B draws) and
    ``loss``.  Needs a posterior (not prior ``none``) and β = 1.

    :param k: importance samples per data point.
    """

    name = "iwae"

    def __init__(self, config, *, k: int = 5) -> None:
        super().__init__(config)
        if k < 1:
            raise ConfigError(f"iwae: k must be at least 1, got {k}")
        if config.beta != 1.0:
            raise ConfigError(f"iwae is the β = 1 bound; drop --beta {config.beta:g}")
        self.k = int(k)

    def bind(self, model) -> None:
        if not model.prior.stochastic:
            raise ConfigError("iwae needs a posterior q(z|x), but prior 'none' is a deterministic autoencoder; "
                              "use --objective elbo")
        if model.drops_likelihood:
            raise ConfigError("iwae is a bound on log p(x) and keeps the likelihood term, but a regularizer asks to "
                              "drop it (drops_likelihood, e.g. dec:recon=false); use --objective elbo")

    def forward(self, model, x, c=None) -> StepOutput:
        return model(x, c, samples=self.k)

    def log_weights(self, model, record: StepOutput) -> torch.Tensor:
        """``log p(x|z_i) + log p(z_i) − log q(z_i|x)`` as ``[k, B]`` nats."""
        q, p = model.prior.posterior(record.params), model.prior.distribution()
        z = record.z_sample
        return (record.log_px + p.log_prob(z) - q.log_prob(z)).view(self.k, -1)

    def terms(self, model, record: StepOutput):
        bound = (torch.logsumexp(self.log_weights(model, record), 0) - math.log(self.k)).mean()
        return -bound, {"iwae": bound, "recon": -record.log_px.mean(), "kl": record.kl.mean()}


@hookimpl
def vaekit_register_objectives(registry):
    registry.register("elbo", ELBO)
    registry.register("iwae", IWAE)
