"""The plugin interfaces: encoder, decoder, prior, likelihood, regularizer and the training objective.

Shapes use ``B`` for the batch, ``S`` for the data shape (``(C, H, W)`` for
images, ``(D,)`` for vectors), ``F`` for the encoder's feature size and ``d``
for the latent dimension.  Log-densities are in nats, one value per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributions import Distribution, Normal, kl_divergence

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig
    from .model import VAEModel
    from .training import Trainer


class Plugin(nn.Module):
    """What every plugin kind shares: :meth:`bind`, its view of the composed model."""

    def bind(self, model: "VAEModel") -> None:
        """Called once when this plugin is composed into ``model`` — when a model is built, and so
        when a run is loaded, before its weights are loaded — after every piece exists.

        ``model`` gives ``encoder``, ``head`` (the posterior head), ``prior``, ``decoder``,
        ``likelihood``, ``regularizers``, ``data_shape``, ``latent_dim``; its device is wherever
        the model is moved later, so read devices when used, not here.  Parameters and buffers
        created here are part of the model's state (saved, loaded, moved).  Keep a reference to
        the model or its parts with ``object.__setattr__(self, "_model", model)``, so it is not
        registered as a sub-module twice.  Example: a VampPrior (Tomczak & Welling 2018) creates its
        pseudo-inputs of shape ``[K, *model.data_shape]`` and evaluates ``model.encoder`` on them.
        Default: nothing.
        """


class Encoder(Plugin):
    """Feature extractor ``x [B, *S] -> h [B, F]``.

    Subclasses call ``super().__init__(input_shape)`` and set
    :attr:`out_features` (``F``).  The posterior head that maps ``h`` to the
    posterior's parameters is added by the pipeline, from the prior.
    Encoders must be TorchScript-scriptable or traceable (for export).
    """

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Decoder(Plugin):
    """Generator ``z [B, d] -> likelihood parameters [B, *output_shape]``.

    ``output_shape`` is the data shape with its first dimension multiplied by
    the likelihood's :attr:`Likelihood.params_per_channel` (``k``): ``(k·C, H, W)``
    or ``(k·D,)``.  Decoders must be scriptable or traceable.
    """

    def __init__(self, latent_dim: int, output_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.output_shape = tuple(int(s) for s in output_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class Prior(Plugin):
    """A prior p(z) over ``[d]`` together with its posterior family q(z|x).

    The pipeline builds the posterior head with :meth:`posterior_head`; the
    head maps ``h [B, F]`` to ``params [B, param_dim]``, which the prior
    interprets.  :attr:`stochastic` is False for deterministic autoencoders
    (no sampling, no KL).
    """

    stochastic: bool = True
    param_dim: int

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if int(latent_dim) < 1:
            raise ConfigError(f"latent-dim must be at least 1, got {latent_dim}")
        self.latent_dim = int(latent_dim)
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def posterior_head(self, in_features: int) -> nn.Module:
        """The layer ``h [B, F] -> params [B, param_dim]`` (default: one ``nn.Linear``)."""
        return nn.Linear(in_features, self.param_dim)

    def posterior(self, params: torch.Tensor) -> Distribution:
        """q(z|x) with batch shape ``[B]`` and event shape ``[d]``."""
        raise NotImplementedError(f"{type(self).__name__} has no posterior distribution")

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The posterior mean (the code of a deterministic AE), ``[B, d]``."""
        return self.posterior(params).mean

    def distribution(self) -> Distribution:
        """p(z) with event shape ``[d]``, on the prior's device."""
        raise NotImplementedError(f"{type(self).__name__} has no prior distribution")

    def rsample_kl(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One reparameterised sample ``z [B, d]`` and ``KL(q(z|x) ‖ p(z))`` per sample ``[B]`` (nats).

        Default: ``rsample`` from :meth:`posterior`, and the analytic
        ``torch.distributions.kl_divergence`` where one is registered, else the
        one-sample Monte-Carlo estimate ``log q(z|x) − log p(z)``.
        """
        q = self.posterior(params)
        z = q.rsample()
        p = self.distribution()
        try:
            kl = kl_divergence(q, p)
        except NotImplementedError:
            kl = q.log_prob(z) - p.log_prob(z)
        return z, kl

    def kl_per_unit(self, params: torch.Tensor) -> torch.Tensor:
        """``KL(q(z_j|x) ‖ p(z_j))`` of each latent unit ``j``, ``[B, d]`` nats; summed over ``j`` it is
        the KL of :meth:`rsample_kl`.  Free bits (Kingma et al. 2016, the IAF paper) clamp it per unit.

        Default: for a factorised posterior and prior — each an (``Independent``) ``Normal`` — the
        closed form ``torch.distributions.kl_divergence`` of the per-unit normals (for N(μ, σ²)
        against N(0, 1): ``½(σ² + μ² − 1 − log σ²)``).  Raises ConfigError for any other pair
        (a full-covariance or mixture posterior has no per-unit KL); override it where one exists.
        """
        q, p = base_of(self.posterior(params), Normal), base_of(self.distribution(), Normal)
        if q is None or p is None:
            raise ConfigError(f"free bits need a KL per latent unit, i.e. a factorised Gaussian posterior and prior, "
                              f"and this prior's posterior is a {type(self.posterior(params)).__name__}; drop free_bits "
                              "or use --prior gaussian (covariance=diagonal)")
        return kl_divergence(q, p)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from p(z), ``[n, d]``, on the prior's device; a ``generator`` (any device)
        makes them reproducible (:func:`sample_with_generator`).  Every sampling path — samples.png,
        ``vaekit sample``, :meth:`VAEModel.sample` — comes here; override it for a sampler of your own."""
        p = self.distribution()
        if generator is None:
            return p.sample((n,))
        return sample_with_generator(p, n, generator, self._device_anchor.device)


def base_of(p: Distribution, kind: type) -> Distribution | None:
    """The distribution under an ``Independent`` (or ``p`` itself) if it is exactly of type ``kind``, else None."""
    base = p.base_dist if isinstance(p, torch.distributions.Independent) else p
    return base if type(base) is kind else None


def sample_with_generator(p: Distribution, n: int, generator: torch.Generator,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """``n`` reproducible draws ``[n, *batch_shape, *event_shape]`` from any ``torch.distributions`` ``p``
    whose parameters live on ``device``, driven by ``generator``.

    An (``Independent``) Normal or Uniform draws its standard noise from ``generator`` itself
    (``z = loc + scale·ε``, the numbers an exported model's ``sample(n, seed)`` draws too).  Any
    other distribution — mixtures, VampPriors, flows — samples with ``p.sample`` under torch's
    global RNG seeded from ``generator`` and forked (:func:`vaekit.rng.seeded_noise`), so the
    result depends only on the generator and the caller's random streams are left untouched.
    """
    from .rng import seed_from, seeded_noise

    shape = (n,) + tuple(p.batch_shape) + tuple(p.event_shape)
    normal, uniform = base_of(p, torch.distributions.Normal), base_of(p, torch.distributions.Uniform)
    if normal is not None:
        eps = torch.randn(shape, generator=generator, device=generator.device).to(normal.loc.device)
        return normal.loc + normal.scale * eps
    if uniform is not None:
        u = torch.rand(shape, generator=generator, device=generator.device).to(uniform.low.device)
        return uniform.low + (uniform.high - uniform.low) * u
    with seeded_noise(seed_from(generator), torch.device(device)):
        return p.sample((n,))


class Likelihood(Plugin):
    """The decoder's likelihood p(x|z), from the decoder's output ``params [B, k·C, ...]``.

    :attr:`params_per_channel` is ``k``.  :meth:`log_prob` is summed over the
    data dimensions: ``[B]`` nats.  :attr:`normalized` is False for robust
    losses that are not densities (their "nats" are not comparable).
    """

    params_per_channel: int = 1
    normalized: bool = True
    default_binarize: str = "none"

    def __init__(self, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)

    def distribution(self, params: torch.Tensor) -> Distribution:
        """p(x|z) with batch shape ``[B]`` and event shape ``S``."""
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` per sample, ``[B]`` nats, summed over data dimensions."""
        return self.distribution(params).log_prob(x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean ``E[x|z]``, ``[B, *S]`` (what reconstructions and samples show)."""
        return self.distribution(params).mean

    def check_data(self, x: torch.Tensor, what: str) -> None:
        """Raise :class:`~vaekit.errors.DataError` if ``x`` is outside this likelihood's support."""

    def normalized_for(self, x: torch.Tensor) -> bool:
        """Whether :meth:`log_prob` is a normalised log-density for data ``x [N, *S]``, so that
        ELBO and NLL are defined; else evaluation reports it as a loss.  Default: :attr:`normalized`."""
        return self.normalized


@dataclass
class StepOutput:
    """Everything one forward pass computed; regularizers read their penalties from it.

    x: ``[B, *S]`` clean data (the reconstruction target); x_input: ``[B, *S]``
    what the encoder saw (corrupted for denoising); h: ``[B, F]``; params:
    ``[B, P]`` posterior parameters; z: ``[B, d]`` the (transformed) code;
    kl: ``[B]`` nats (zeros for deterministic AEs); likelihood_params: decoder
    output; log_px: ``[B]`` nats; c: optional condition/label ``[B]``;
    z_sample: ``[B, d]`` the draw z ~ q(z|x) before any regularizer's ``transform_latent``
    (what log q(z|x) and log p(z) are evaluated at).  A forward pass with ``samples=k``
    (:meth:`vaekit.model.VAEModel.forward`) has ``B = k·N`` rows: draw ``i`` of data point ``n``
    is row ``i·N + n``.  index: ``[N]`` int64, the positions in the training set
    (``trainer.train_x``) of the batch's N data points, set by the trainer on every training step
    (row ``i·N + n`` is training sample ``index[n]``); None outside training steps (evaluation,
    pretraining).  Per-sample state of a regularizer (DEC's target distribution) is read with it.
    """

    x: torch.Tensor
    x_input: torch.Tensor
    h: torch.Tensor
    params: torch.Tensor
    z: torch.Tensor
    kl: torch.Tensor
    likelihood_params: torch.Tensor
    log_px: torch.Tensor
    c: torch.Tensor | None = None
    z_sample: torch.Tensor | None = None
    index: torch.Tensor | None = None


def standard_normal(latent_dim: int, like: torch.Tensor) -> Distribution:
    """N(0, I) over ``[latent_dim]`` on the device and dtype of ``like``."""
    zeros = like.new_zeros(latent_dim)
    return torch.distributions.Independent(
        torch.distributions.Normal(zeros, torch.ones_like(zeros), validate_args=False), 1, validate_args=False
    )


class Regularizer(Plugin):
    """A named, weighted addition to the training step.

    A regularizer may (all optional):

    * :meth:`corrupt` the encoder's input (denoising AEs);
    * :meth:`transform_latent` a latent draw into the code the decoder reads (top-k of a
      k-sparse AE, the sigmoid of a sparse AE) — part of encoding: ``VAEModel.code``, the
      training step, reconstructions and sampling apply it, ``VAEModel.decode`` (which takes
      codes) does not;
    * :meth:`transform_features` the posterior mean into the features ``VAEModel.embed`` returns
      (by default the code; a k-sparse AE with alpha > 1 keeps more units there);
    * return a :meth:`penalty` read from the step's :class:`StepOutput`; the
      pipeline adds ``weight * penalty`` to the loss and logs it under :attr:`name`;
    * own parameters with an optimizer of their own (:meth:`configure_optimizer`),
      stepped by :meth:`update` before each model step, alternating with it
      (e.g. an adversarial discriminator);
    * react to :meth:`on_fit_start` / :meth:`on_step_end` / :meth:`on_epoch_end`, and stop the run
      early with ``trainer.request_stop(reason)`` (a convergence test);
    * keep per-run training state that is not part of the model (per-sample tables sized by the
      data) through :meth:`training_state` / :meth:`load_training_state`, saved with the trainer
      state so a resumed run continues exactly;
    * leave the likelihood term out of the loss (:attr:`drops_likelihood`).
    """

    name: str = "regularizer"
    sparse_codes: bool = False
    """True if this regularizer makes the codes sparse (sparse and k-sparse AEs); runs with one get a
    histogram of code activations (``codes.png``)."""
    drops_likelihood: bool = False
    """True if the loss should not contain the likelihood (reconstruction) term ``−log p(x|z)``: the
    objective leaves it out (still logging ``recon``), so the regularizer's penalty (and a stochastic
    prior's KL) is the whole loss — pure DEC (Xie et al. 2016) trains the encoder on KL(P‖Q) alone.
    An instance attribute may set it from an option.  Objectives that cannot drop it (``iwae``, a
    bound on log p(x)) refuse such a regularizer with a ConfigError."""
    supports_distributed: bool = True
    """False if this regularizer cannot train on several ``torchrun`` processes: it keeps per-sample
    state indexed by ``record.index`` (DEC's target distribution, DCN's assignments), which each rank
    would update for its own share of the batch only, so the ranks' states part.  ``vaekit run`` under
    torchrun refuses such a regularizer with a ConfigError (docs/scaling.md).  Penalties that are a
    mean of per-sample terms are exact under torchrun; batch statistics (MMD) are each rank's own."""

    def __init__(self, latent_dim: int, data_shape: tuple[int, ...], weight: float = 1.0) -> None:
        """Raises ConfigError, naming :attr:`name`, for a ``weight`` that is not a finite number ≥ 0
        (a negative weight would reward the penalty)."""
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.data_shape = tuple(data_shape)
        weight = float(weight)
        if not (math.isfinite(weight) and weight >= 0):
            raise ConfigError(f"{self.name}: weight must be a finite number >= 0, got {weight}")
        self.weight = weight

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input for clean ``x [B, *S]`` (training only). Default: ``x``."""
        return x

    def transform_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The code the decoder reads for a latent draw ``z``, ``[B, d] -> [B, d]``. Default: ``z``.

        Applied once, as part of encoding: to the posterior mean (``VAEModel.code``, reconstructions),
        to the training step's sample, and to draws from p(z) when sampling and in the
        importance-sampled NLL; never by ``decode``, so it need not be idempotent.  The decoder reads
        the same transform in training and evaluation, so it should not depend on ``self.training``.
        Must be TorchScript-scriptable (it is exported).
        """
        return z

    def transform_features(self, z: torch.Tensor) -> torch.Tensor:
        """The features for a posterior mean ``z``, ``[B, d] -> [B, d]``: what ``VAEModel.embed``,
        ``vaekit embed`` and an exported ``encode`` return; never decoded.  Default:
        ``self.transform_latent(z)`` (features are the codes).  Override it where features for a
        downstream model differ from the codes the decoder reads (a k-sparse AE keeps αk units here,
        k in :meth:`transform_latent`; Makhzani & Frey 2013).  Must be TorchScript-scriptable.
        """
        return self.transform_latent(z)

    def penalty(self, record: StepOutput) -> torch.Tensor | None:
        """A scalar penalty (already averaged over the batch), or None for no penalty.  Return None for
        every training batch or for none: under torchrun the ranks' loss terms must have the same names
        at every step (a rank's share may hold a single sample), else the run stops with a TrainingError."""
        return None

    def configure_optimizer(self) -> torch.optim.Optimizer | None:
        """An optimizer for this regularizer's own parameters, or None."""
        return None

    def update(self, record: StepOutput, optimizer: torch.optim.Optimizer) -> dict[str, float | torch.Tensor]:
        """One step of the regularizer's own optimizer (before the model's step); returns metrics, means over
        the batch: floats or detached one-element tensors (better: the trainer reads tensors with the loss
        terms every few steps instead of waiting for the device each step)."""
        return {}

    def bind(self, model: "VAEModel") -> None:
        """See :meth:`Plugin.bind`; the default keeps a reference to ``model.prior`` as ``self._prior``."""
        object.__setattr__(self, "_prior", model.prior)  # a reference, not a sub-module (no duplicate state)

    def latent_prior(self) -> Distribution | None:
        """The distribution this regularizer pushes the codes towards, if any (AAE, WAE).

        Models whose prior is ``none`` sample from it. Default: None.
        """
        return None

    def on_fit_start(self, trainer: "Trainer") -> None:
        """Called before training starts."""

    def on_step_end(self, trainer: "Trainer", record: StepOutput) -> None:
        """Called after each training step's optimizer update (``trainer.step`` already counts it),
        with that step's ``record`` (its ``index`` names the batch's training samples).  E.g. DCN's
        assignment and online centroid update (Yang et al. 2017, Algorithm 1), DEC's periodic
        target refresh.  A call to ``trainer.request_stop(reason)`` here ends the run after this
        step (the epoch is evaluated and checkpointed).  Default: nothing."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        """Called after each epoch."""

    def training_state(self) -> dict[str, torch.Tensor]:
        """Tensors of this regularizer's training state that are not model state, by name: saved in
        ``trainer_state.safetensors`` at every checkpoint and given back to :meth:`load_training_state`
        when the run resumes (before :meth:`on_fit_start`).  For state whose shape depends on the
        training data (a per-sample table ``[N, k]``), which ``model.safetensors`` cannot hold since a
        loaded run rebuilds the model from its config alone.  Default: ``{}``."""
        return {}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned (on the CPU; move it where needed).  Called
        only when resuming, with exactly the saved names.  Default: nothing."""


class Objective:
    """A training objective: turns the model and a mini-batch into the loss to minimise and its named terms.

    Built once per run as ``factory(config, **options)`` (``config``: the run's
    :class:`~vaekit.config.RunConfig`, for its ``beta`` and ``epochs``), then :meth:`bind` to the
    model.  Each epoch the trainer calls :meth:`set_epoch`; each step it calls :meth:`forward`,
    steps the regularizers that own an optimizer on the record (:meth:`Regularizer.update`),
    then :meth:`loss` and the model's optimizer.  Subclasses implement :meth:`terms`;
    :meth:`loss` adds every regularizer's ``weight · penalty``
    (:meth:`vaekit.model.VAEModel.add_penalties`), so no objective drops them.  Losses are nats per
    data point (summed over data dimensions and latent units, mean over the batch).
    Evaluation (test ELBO, NLL) does not depend on the objective.
    """

    name: str = "objective"

    def __init__(self, config: "RunConfig") -> None:
        self.config = config

    def bind(self, model: "VAEModel") -> None:
        """Called once with the composed model before training.  Raises ConfigError if this
        objective cannot train it (e.g. a bound that needs a posterior on a deterministic AE).
        Default: nothing."""

    def recorded_options(self, options: dict) -> dict:
        """The options config.json records for this objective, given the resolved ``options``: fill in
        values derived at the run's start that a resumed run must keep (the ``elbo`` cycles' horizon).
        Default: ``options`` unchanged."""
        return options

    def set_epoch(self, epoch: int) -> dict[str, float]:
        """Called before each training epoch (``epoch`` counts from 1, also after a resume), so
        schedules are a function of the epoch alone.  Returns values to log in that epoch's
        ``metrics.jsonl`` record and line (e.g. ``{"beta": 0.5}``).  Default: ``{}``."""
        return {}

    def forward(self, model: "VAEModel", x: torch.Tensor, c: torch.Tensor | None = None) -> StepOutput:
        """The step's forward pass on ``x [B, *S]`` (``c``: optional labels ``[B]``).  Default:
        ``model(x, c)``; a multi-sample objective asks for ``model(x, c, samples=k)``."""
        return model(x, c)

    def terms(self, model: "VAEModel", record: StepOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This objective's own scalar loss (nats, mean over the batch) and its named scalar terms,
        without regularizer penalties."""
        raise NotImplementedError

    def loss(self, model: "VAEModel", record: StepOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The scalar loss to minimise and its named terms (``loss`` among them): :meth:`terms` plus
        every regularizer's ``weight · penalty``."""
        loss, terms = self.terms(model, record)
        return model.add_penalties(record, loss, terms)
