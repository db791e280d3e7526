"""The composed model: encoder → posterior head → reparameterize + KL → decoder → likelihood."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from .conditioning import ConditionalDecoder, ConditionalEncoder, check_labels, conditioned_input_shape
from .errors import ConfigError, first_line, is_out_of_memory
from torch.distributions import Distribution

from .interfaces import Decoder, Encoder, Likelihood, Prior, Regularizer, StepOutput, sample_with_generator
from .registry import PluginSpec, coerce

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig
    from .manager import PluginManager


class VAEModel(nn.Module):
    """An (variational) autoencoder composed from plugins.

    ``forward(x [B, *S]) -> StepOutput``; :meth:`loss` turns the record into
    ``mean_B(−log p(x|z) + β·KL) + Σ weight·penalty`` (Kingma & Welling 2014,
    eq. 10 with β of Higgins et al. 2017); training uses the run's objective
    (:class:`~vaekit.interfaces.Objective`, ``elbo`` by default).  A deterministic autoencoder is the
    case ``prior.stochastic == False`` (KL = 0).

    ``num_classes > 0`` makes it a conditional VAE (Sohn et al. 2015; :mod:`vaekit.conditioning`): the
    encoder plugin was built for the input with K one-hot channels appended and the decoder plugin for
    ``latent_dim + K``; they are wrapped here, and every method taking ``c`` needs the labels ``c [B]``
    (int64).  Unconditional models (``num_classes == 0``) ignore ``c``.
    """

    def __init__(
        self,
        encoder: Encoder,
        prior: Prior,
        decoder: Decoder,
        likelihood: Likelihood,
        regularizers: Iterable[Regularizer] = (),
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.encoder = encoder if not self.num_classes else ConditionalEncoder(encoder, self.num_classes)
        self.prior = prior
        self.head = prior.posterior_head(encoder.out_features)
        self.decoder = decoder if not self.num_classes else ConditionalDecoder(decoder, self.num_classes)
        self.likelihood = likelihood
        self.regularizers = nn.ModuleList(regularizers)
        for plugin in (encoder, prior, decoder, likelihood, *self.regularizers):
            plugin.bind(self)

    @property
    def conditional(self) -> bool:
        """True for a conditional VAE (``--condition label``): its methods need the labels ``c``."""
        return self.num_classes > 0

    def _features(self, x: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """The encoder's features ``[B, F]`` of ``x`` (given the labels ``c`` for a conditional model)."""
        if not self.num_classes:
            return self.encoder(x)
        return self.encoder(x, check_labels(c, self.num_classes, x.shape[0]).to(x.device))

    @property
    def drops_likelihood(self) -> bool:
        """True if a regularizer asks to leave the likelihood term out of the loss
        (:attr:`~vaekit.interfaces.Regularizer.drops_likelihood`, e.g. pure DEC)."""
        return any(reg.drops_likelihood for reg in self.regularizers)

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    @property
    def data_shape(self) -> tuple[int, ...]:
        return self.likelihood.data_shape

    # --- pieces -------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior parameters ``[B, P]`` for data ``x [B, *S]`` (and labels ``c [B]`` if conditional).

        Raises ConfigError for a conditional model without ``c`` or with a label out of range."""
        return self.head(self._features(x, c))

    def code(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The code the decoder reads for ``x``, ``[B, d]``: :meth:`transform_latent` of the posterior mean
        (what :meth:`reconstruct` decodes)."""
        return self.transform_latent(self.prior.mean(self.encode(x, c)))

    def embed(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """The features of ``x`` for downstream use, ``[B, d]``: :meth:`transform_features` of the posterior
        mean (``vaekit embed``, an exported ``encode``).  The same as :meth:`code` unless a regularizer's
        features differ from its codes (a k-sparse AE with alpha > 1 keeps αk units here, k in the code)."""
        return self.transform_features(self.prior.mean(self.encode(x, c)))

    def transform_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The code for latent draws ``z [B, d]``: each regularizer's
        :meth:`~vaekit.interfaces.Regularizer.transform_latent` in order (top-k of a k-sparse AE,
        the sigmoid of a sparse AE); ``z`` itself when none transforms.  Part of encoding: the
        decoder reads its output, and :meth:`decode` does not apply it again."""
        for reg in self.regularizers:
            z = reg.transform_latent(z)
        return z

    def transform_features(self, z: torch.Tensor) -> torch.Tensor:
        """The features for latent values ``z [B, d]``: each regularizer's
        :meth:`~vaekit.interfaces.Regularizer.transform_features` in order (by default its
        ``transform_latent``).  Never decoded."""
        for reg in self.regularizers:
            z = reg.transform_features(z)
        return z

    def decode(self, code: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """Likelihood parameters for codes ``code [B, d]`` — what :meth:`code` or
        :meth:`transform_latent` returns; no latent transform is applied here.  A conditional model
        needs the labels ``c [B]`` (ConfigError without them or out of range)."""
        if not self.num_classes:
            return self.decoder(code)
        return self.decoder(code, check_labels(c, self.num_classes, code.shape[0]).to(code.device))

    def decode_mean(self, code: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x|code]`` ``[B, *S]``: what samples and reconstructions show (no latent transform applied)."""
        return self.likelihood.mean(self.decode(code, c))

    def reconstruct(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """``E[x|z = posterior mean]`` ``[B, *S]``: ``decode_mean(code(x, c), c)``."""
        return self.decode_mean(self.code(x, c), c)

    def sampling_distribution(self) -> Distribution | None:
        """p(z) to generate from: the prior's, else the latent target of a regularizer (AAE, WAE), else None."""
        if self.prior.stochastic:
            return self.prior.distribution()
        for reg in self.regularizers:
            target = reg.latent_prior()
            if target is not None:
                return target
        return None

    @property
    def can_sample(self) -> bool:
        """A stochastic prior always can (through its ``sample``); prior ``none`` needs a latent target."""
        return self.prior.stochastic or self.sampling_distribution() is not None

    def sample_latent(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` latent draws ``[n, d]`` from p(z) (:meth:`transform_latent` makes them codes): the prior's :meth:`~vaekit.interfaces.Prior.sample`, or for
        prior ``none`` the latent target of a regularizer (AAE, WAE); ``generator`` makes them reproducible.

        Raises ConfigError for a plain deterministic autoencoder (nothing to sample z from).
        """
        if self.prior.stochastic:
            return self.prior.sample(n, generator)
        p = self.sampling_distribution()
        if p is None:
            raise ConfigError("this model has no prior distribution to sample from (prior 'none' and no latent target)")
        device = self.prior._device_anchor.device
        return p.sample((n,)) if generator is None else sample_with_generator(p, n, generator, device)

    def sample(self, n: int, generator: torch.Generator | None = None, label: int | None = None) -> torch.Tensor:
        """``n`` samples' likelihood means ``[n, *S]``: ``decode_mean(transform_latent(z), c)``, z from
        :meth:`sample_latent`; a conditional model generates from p(x|z, c = ``label``) for every sample.

        Raises ConfigError for a conditional model without ``label`` or with one out of range, and for
        an unconditional model given a ``label``.
        """
        if label is not None and not self.num_classes:
            raise ConfigError("this model is not conditional (trained without --condition label): it takes no label")
        z = self.transform_latent(self.sample_latent(n, generator))
        c = None if label is None else torch.full((n,), int(label), dtype=torch.long, device=z.device)
        return self.decode_mean(z, c)

    # --- training step ------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None, samples: int = 1,
                chunk_rows: int | None = None) -> StepOutput:
        """One training-step forward pass on ``x [N, *S]``: corrupt (training only), encode,
        reparameterize + KL (:meth:`~vaekit.interfaces.Prior.rsample_kl`), decode, log p(x|z).

        ``samples = k > 1`` draws k latent samples per data point for multi-sample bounds (IWAE):
        the encoder runs once, its posterior parameters are repeated k times and the draws are
        decoded in one batched pass, so every field of the record has ``k·N`` rows (draw ``i`` of
        point ``n`` at row ``i·N + n``).

        ``chunk_rows``: the encoder and the decoder run that many rows at a time (the prior's draw,
        the latent transform and the likelihood still see all rows at once, so the noise is that of
        one pass): the networks' activations of a chunk, not of the batch, are alive at once; the
        record's fields (the decoder's output among them) are the batch's (evaluation).
        """
        x_input = x
        if self.training:
            for reg in self.regularizers:
                x_input = reg.corrupt(x_input)
        h = _in_chunks(self._features, x_input, c, chunk_rows)
        params = self.head(h)
        if samples > 1:
            x, x_input, h, params = (_repeat_rows(t, samples) for t in (x, x_input, h, params))
            c = None if c is None else _repeat_rows(c, samples)
        z_sample, kl = self.prior.rsample_kl(params)
        z = self.transform_latent(z_sample)
        lik_params = _in_chunks(self.decode, z, c, chunk_rows)
        log_px = self.likelihood.log_prob(lik_params, x)
        return StepOutput(x, x_input, h, params, z, kl, lik_params, log_px, c, z_sample)

    def elbo_terms(self, record: StepOutput, beta: float = 1.0,
                   kl: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The β-ELBO loss ``mean_B(−log p(x|z)) + β·kl`` (Kingma & Welling 2014, eq. 10; β of Higgins
        et al. 2017) and its terms ``recon`` and ``kl`` (nats, mean over the batch), without penalties.
        ``kl``: the KL term the loss uses (default ``mean_B record.kl``; free bits pass a clamped one);
        the logged ``kl`` is always ``mean_B record.kl``.  A deterministic AE's loss is ``recon``.
        With :attr:`drops_likelihood` the loss leaves ``recon`` out (it is still logged)."""
        recon = -record.log_px.mean()
        kl_mean = record.kl.mean()
        fit = recon if not self.drops_likelihood else torch.zeros_like(recon)
        loss = fit
        if self.prior.stochastic:
            kl_term = kl_mean if kl is None else kl
            # β = 1 adds the KL itself: the same value, one multiply and its backward node fewer
            loss = fit + (kl_term if beta == 1.0 else beta * kl_term)
        return loss, {"recon": recon, "kl": kl_mean}

    def add_penalties(self, record: StepOutput, loss: torch.Tensor,
                      terms: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss + Σ weight·penalty`` over the regularizers, each penalty added to ``terms`` under the
        regularizer's name (the same one twice: ``mmd``, ``mmd_2``), and ``terms["loss"]``.  Every
        objective's :meth:`~vaekit.interfaces.Objective.loss` ends here."""
        terms = dict(terms)
        for reg in self.regularizers:
            penalty = reg.penalty(record)
            if penalty is not None:
                name, n = reg.name, 1
                while name in terms:  # the same regularizer twice: mmd, mmd_2
                    n += 1
                    name = f"{reg.name}_{n}"
                terms[name] = penalty
                loss = loss + reg.weight * penalty
        terms["loss"] = loss
        return loss, terms

    def loss(self, record: StepOutput, beta: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss and its named terms: :meth:`elbo_terms` plus the penalties (:meth:`add_penalties`),
        what the ``elbo`` objective computes without schedules or free bits (``recon`` = −log p(x|z)
        and ``kl`` in nats, mean over the batch)."""
        return self.add_penalties(record, *self.elbo_terms(record, beta))


def _in_chunks(fn, x: torch.Tensor, c: torch.Tensor | None, rows: int | None) -> torch.Tensor:
    """``fn(x, c)``, computed ``rows`` rows of ``x`` (and ``c``) at a time when ``x`` has more (``None``: at once)."""
    if rows is None or len(x) <= rows:
        return fn(x, c)
    return torch.cat([fn(x[i : i + rows], None if c is None else c[i : i + rows]) for i in range(0, len(x), rows)])


def _repeat_rows(t: torch.Tensor, k: int) -> torch.Tensor:
    """``t [N, ...] -> [k·N, ...]``, the rows repeated k times (row ``i·N + n`` is ``t[n]``)."""
    return t.repeat((k,) + (1,) * (t.dim() - 1))


def build_model(config: "RunConfig", data_shape: tuple[int, ...], pm: "PluginManager",
                num_classes: int | None = None) -> VAEModel:
    """Build the model a config describes for data of shape ``data_shape``.

    ``num_classes`` (K, the dataset's) is needed for ``config.condition == "label"``: the encoder plugin
    is then built for :func:`~vaekit.conditioning.conditioned_input_shape` and the decoder plugin for
    ``latent_dim + K`` (:mod:`vaekit.conditioning`).  Raises UnknownPluginError / ConfigError for
    unknown plugins, bad options or incompatible choices (e.g. a conv encoder on vector data, a
    conditional model of data without labels), ConfigError if its weights do not fit in memory.
    """
    try:
        return _build_model(config, data_shape, pm, num_classes)
    except Exception as e:  # noqa: BLE001 - only a failed allocation is turned into a ConfigError
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"the model does not fit in memory ({first_line(e, 160)}): lower --latent-dim "
                          f"(now {config.latent_dim}) or the layer sizes") from None


def _build_model(config: "RunConfig", data_shape: tuple[int, ...], pm: "PluginManager",
                 num_classes: int | None = None) -> VAEModel:
    shape = tuple(int(s) for s in data_shape)
    k = 0
    if config.condition == "label":
        if not num_classes:
            raise ConfigError("--condition label needs a labelled dataset, and this one has no labels "
                              "(use e.g. --data mnist or --data digits, or --condition none)")
        k = int(num_classes)
    in_shape = conditioned_input_shape(shape, k) if k else shape
    encoder = _checked(pm.encoders.build(config.encoder, input_shape=in_shape), Encoder, "encoder", config.encoder.name)
    if not isinstance(getattr(encoder, "out_features", None), int):
        raise ConfigError(f"encoder {config.encoder.name!r} does not set an integer 'out_features'")
    prior = _checked(pm.priors.build(config.prior, latent_dim=config.latent_dim), Prior, "prior", config.prior.name)
    likelihood = _checked(
        pm.likelihoods.build(config.likelihood, data_shape=shape), Likelihood, "likelihood", config.likelihood.name
    )
    out_shape = (likelihood.params_per_channel * shape[0],) + shape[1:]
    dec_spec = decoder_spec(config, pm)
    decoder = _checked(
        pm.decoders.build(dec_spec, latent_dim=config.latent_dim + k, output_shape=out_shape), Decoder, "decoder", dec_spec.name
    )
    regularizers = [
        _checked(pm.regularizers.build(spec, latent_dim=config.latent_dim, data_shape=shape), Regularizer, "regularizer", spec.name)
        for spec in config.regularizers
    ]
    model = VAEModel(encoder, prior, decoder, likelihood, regularizers, num_classes=k)
    _check_shapes(model, shape, config, dec_spec.name)
    if k:
        _check_conditional(model, shape, config)
    return model


def decoder_spec(config: "RunConfig", pm: "PluginManager") -> PluginSpec:
    """The decoder a config builds: ``config.decoder`` if set, else the encoder's mirror.

    The mirror is the decoder plugin of the encoder's name, given the encoder's resolved options
    (defaults included) that the decoder also accepts, with sequence-valued ones reversed: the
    encoder ``mlp:hidden=500,500,2000`` gets the decoder ``mlp:hidden=2000,500,500``, ``conv:channels=32,64``
    gets ``conv:channels=64,32``; scalars such as ``activation`` are kept.  An encoder value the
    decoder's option cannot take (a third-party pair whose same-named options differ in type) is
    left out, so that option keeps the decoder's default.  This is the one place the default decoder
    is computed: :func:`build_model` builds it and ``config.json`` records it.

    Raises UnknownPluginError if no decoder has the encoder's name, ConfigError for bad encoder options.
    """
    if config.decoder is not None:
        return config.decoder
    name = config.encoder.name
    decoder = pm.decoders.get(name)
    options = {}
    for key, value in pm.encoders.resolve_options(config.encoder).items():
        if key not in decoder.options:
            continue
        if isinstance(value, (tuple, list)):
            value = type(value)(reversed(value))
        try:
            options[key] = coerce(value, decoder.options[key].type, f"decoder {name!r} option {key!r}")
        except ConfigError:
            continue
    return PluginSpec(name, options)


def _checked(obj, cls, kind: str, name: str):
    if not isinstance(obj, cls):
        raise ConfigError(f"{kind} {name!r} built a {type(obj).__name__}, not a vaekit {cls.__name__}")
    return obj


@torch.no_grad()
def _check_shapes(model: VAEModel, shape: tuple[int, ...], config: "RunConfig", decoder_name: str) -> None:
    """One dry forward pass on two zero samples, turning shape errors into one readable line."""
    x = torch.zeros((2,) + shape)
    c = torch.zeros(2, dtype=torch.long)
    try:
        h = model._features(x, c)
    except RuntimeError as e:
        raise ConfigError(f"encoder {config.encoder.name!r} cannot take data of shape {list(shape)}: {_first_line(e)}") from None
    if h.shape != (2, model.encoder.out_features):
        raise ConfigError(
            f"encoder {config.encoder.name!r} returned shape {list(h.shape[1:])} per sample, but declares out_features={model.encoder.out_features}"
        )
    z = torch.zeros(2, config.latent_dim)
    try:
        out = model.decode(z, c)
    except RuntimeError as e:
        raise ConfigError(f"decoder {decoder_name!r} failed on codes of size {config.latent_dim}: {_first_line(e)}") from None
    expected = (2,) + model.decoder.output_shape
    if tuple(out.shape) != expected:
        raise ConfigError(
            f"decoder {decoder_name!r} returned {list(out.shape[1:])} per sample, the likelihood needs {list(expected[1:])}"
        )


def _check_conditional(model: VAEModel, shape: tuple[int, ...], config: "RunConfig") -> None:
    """A dry step of a conditional model (two zero samples with labels, every penalty) in eval mode, with the
    RNG streams forked: a prior or regularizer that encodes inputs of its own without their labels
    (``contractive``, a VampPrior's pseudo-inputs) is refused now, naming it, not at the first step."""
    x, c = torch.zeros((2,) + shape), torch.zeros(2, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            try:
                record = model(x, c)
            except ConfigError as e:
                raise ConfigError(f"the prior {config.prior.name!r} does not support --condition label ({e})") from None
            for reg, spec in zip(model.regularizers, config.regularizers):
                try:
                    reg.penalty(record)
                except ConfigError:
                    raise ConfigError(f"the regularizer {spec.name!r} does not support --condition label: it encodes "
                                      "inputs of its own, which carry no labels; drop it or use --condition none") from None
    finally:
        model.train(was_training)


def _first_line(e: BaseException) -> str:
    return first_line(e, limit=10_000)
