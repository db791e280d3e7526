"""Contract checks for plugin authors: call them from your own tests.

Each ``check_*`` builds the plugin through its registry entry and asserts the
interface's promises (shapes, finiteness, gradients, TorchScript export).  Priors and
regularizers are checked inside a small composed model (:func:`composed_model`), so they are
bound to it, train a step, sample and export (or refuse to) as in a real run.
They raise ``AssertionError`` with a readable message on failure.

    from vaekit.testing import check_encoder
    def test_my_encoder():
        check_encoder(get_plugin_manager().encoders.get("mine"), (1, 28, 28))
"""

from __future__ import annotations

import torch
from torch import nn

from .data import DataBundle
from .interfaces import Decoder, Encoder, Likelihood, Objective, Prior, Regularizer, StepOutput
from .registry import PluginInfo

BATCH = 3


def _build(info: PluginInfo, options=None, **context):
    """The plugin built with its option defaults, overridden by ``options``."""
    defaults = {name: opt.default for name, opt in info.options.items()}
    return info.factory(**context, **{**defaults, **(options or {})})


def check_exportable(module: nn.Module, example: torch.Tensor, what: str) -> None:
    """The module can be scripted, or else traced, and the result computes the same output."""
    module = module.eval()
    with torch.no_grad():
        expected = module(example)
        try:
            exported = torch.jit.script(module)
        except Exception:  # noqa: BLE001 - fall back to tracing, as export does
            exported = torch.jit.trace(module, example)
        got = exported(example)
    assert torch.allclose(got, expected, atol=1e-5), f"{what}: TorchScript output differs from eager"


def check_encoder(info: PluginInfo, input_shape: tuple[int, ...] = (1, 28, 28)) -> Encoder:
    enc = _build(info, input_shape=input_shape)
    assert isinstance(enc, Encoder), f"encoder {info.name!r} must subclass vaekit.Encoder"
    assert isinstance(enc.out_features, int) and enc.out_features > 0, f"encoder {info.name!r}: out_features must be a positive int"
    x = torch.rand((BATCH,) + tuple(input_shape), requires_grad=True)
    h = enc(x)
    assert h.shape == (BATCH, enc.out_features), f"encoder {info.name!r}: output {tuple(h.shape)}, expected {(BATCH, enc.out_features)}"
    assert torch.isfinite(h).all(), f"encoder {info.name!r}: non-finite output"
    h.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), f"encoder {info.name!r}: no finite gradient w.r.t. x"
    check_exportable(enc, torch.rand((BATCH,) + tuple(input_shape)), f"encoder {info.name!r}")
    return enc


def check_decoder(info: PluginInfo, latent_dim: int = 4, output_shape: tuple[int, ...] = (1, 28, 28)) -> Decoder:
    dec = _build(info, latent_dim=latent_dim, output_shape=output_shape)
    assert isinstance(dec, Decoder), f"decoder {info.name!r} must subclass vaekit.Decoder"
    z = torch.randn(BATCH, latent_dim, requires_grad=True)
    out = dec(z)
    assert out.shape == (BATCH,) + tuple(output_shape), f"decoder {info.name!r}: output {tuple(out.shape)}, expected {(BATCH,) + tuple(output_shape)}"
    out.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all(), f"decoder {info.name!r}: no finite gradient w.r.t. z"
    check_exportable(dec, torch.randn(BATCH, latent_dim), f"decoder {info.name!r}")
    return dec


class _FlatEncoder(Encoder):
    """A linear encoder for the composed test models."""

    def __init__(self, input_shape, width: int = 10) -> None:
        super().__init__(input_shape)
        n = 1
        for size in self.input_shape:
            n *= size
        self.lin = nn.Linear(n, width)
        self.out_features = width

    def forward(self, x):
        return torch.tanh(self.lin(x.flatten(1)))


class _FlatDecoder(Decoder):
    """A linear decoder for the composed test models."""

    def __init__(self, latent_dim, output_shape) -> None:
        super().__init__(latent_dim, output_shape)
        n = 1
        for size in self.output_shape:
            n *= size
        self.lin = nn.Linear(self.latent_dim, n)

    def forward(self, z):
        return self.lin(z).view((z.shape[0],) + self.output_shape)


def composed_model(prior: Prior | None = None, regularizers=(), latent_dim: int = 4,
                   data_shape: tuple[int, ...] = (1, 6, 6)):
    """A small :class:`~vaekit.model.VAEModel` (linear encoder/decoder, Bernoulli likelihood, the
    ``gaussian`` prior unless ``prior`` is given) with the plugins under test composed into it, so
    they are bound (:meth:`~vaekit.interfaces.Plugin.bind`) as in a real run."""
    from .model import VAEModel
    from .plugins.likelihoods import BernoulliLikelihood
    from .plugins.priors import GaussianPrior

    return VAEModel(_FlatEncoder(data_shape), prior if prior is not None else GaussianPrior(latent_dim),
                    _FlatDecoder(latent_dim, data_shape), BernoulliLikelihood(data_shape), list(regularizers))


def _train_step(model, info: PluginInfo, kind: str) -> StepOutput:
    """One forward pass, loss and backward on binary data; every gradient finite."""
    x = torch.rand((BATCH,) + model.data_shape).round()
    model.train()
    record = model(x)
    for reg in model.regularizers:
        opt = reg.configure_optimizer()
        if opt is not None:
            reg.update(record, opt)
    loss, terms = model.loss(record)
    assert loss.dim() == 0 and torch.isfinite(loss), f"{kind} {info.name!r}: loss {terms} is not a finite scalar"
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"{kind} {info.name!r}: non-finite gradient of {name}"
    return record


def _export_or_refuse(model, info: PluginInfo, kind: str) -> None:
    """Export to TorchScript works, or is refused up front with a ConfigError naming the problem."""
    import tempfile
    from pathlib import Path

    from .errors import ConfigError
    from .export import export_torchscript, load_exported

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = export_torchscript(model, Path(tmp) / "m.pt")
        except ConfigError:
            return
        exported = load_exported(path)
        with torch.no_grad():
            x = torch.rand((BATCH,) + model.data_shape)
            assert torch.allclose(exported.reconstruct(x), model.eval().reconstruct(x), atol=1e-5), (
                f"{kind} {info.name!r}: the exported model reconstructs differently")


def check_prior(info: PluginInfo, latent_dim: int = 4, data_shape: tuple[int, ...] = (1, 6, 6), **options) -> Prior:
    """The prior (with ``options`` overriding its defaults, e.g. ``covariance="full"``) inside a small composed
    model: bound, trains a step, its posterior draws ``[k, B, d]`` with per-draw log-densities (the
    importance-sampled NLL's use), samples reproducibly, exports or refuses."""
    prior = _build(info, options, latent_dim=latent_dim)
    assert isinstance(prior, Prior), f"prior {info.name!r} must subclass vaekit.Prior"
    model = composed_model(prior, latent_dim=latent_dim, data_shape=data_shape)
    record = _train_step(model, info, "prior")
    params, z, kl = record.params, record.z, record.kl
    assert params.shape == (BATCH, prior.param_dim), f"prior {info.name!r}: head output {tuple(params.shape)}"
    assert z.shape == (BATCH, latent_dim), f"prior {info.name!r}: z has shape {tuple(z.shape)}"
    assert kl.shape == (BATCH,), f"prior {info.name!r}: kl has shape {tuple(kl.shape)}, expected ({BATCH},)"
    assert prior.mean(params).shape == (BATCH, latent_dim)
    if prior.stochastic:
        with torch.no_grad():
            q = prior.posterior(params)
            assert q.log_prob(z).shape == (BATCH,), f"prior {info.name!r}: posterior log_prob must be per sample"
            zk = q.rsample((2,))
            assert zk.shape == (2, BATCH, latent_dim) and q.log_prob(zk).shape == (2, BATCH), (
                f"prior {info.name!r}: posterior rsample((k,)) must be [k, B, d] with log_prob [k, B]")
            p = prior.distribution()
            assert p.log_prob(z).shape == (BATCH,), f"prior {info.name!r}: prior log_prob must be per sample"
            assert prior.sample(5).shape == (5, latent_dim)
            g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
            assert torch.equal(prior.sample(5, g1), prior.sample(5, g2)), f"prior {info.name!r}: seeded sampling is not reproducible"
            assert model.sample(2, torch.Generator().manual_seed(0)).shape == (2,) + model.data_shape
    else:
        assert torch.all(kl == 0), f"deterministic prior {info.name!r} must have zero KL"
    _export_or_refuse(model, info, "prior")
    return prior


def check_likelihood(info: PluginInfo, data_shape: tuple[int, ...] = (1, 28, 28)) -> Likelihood:
    lik = _build(info, data_shape=data_shape)
    assert isinstance(lik, Likelihood), f"likelihood {info.name!r} must subclass vaekit.Likelihood"
    out_shape = (lik.params_per_channel * data_shape[0],) + tuple(data_shape[1:])
    params = torch.randn((BATCH,) + out_shape, requires_grad=True)
    x = torch.rand((BATCH,) + tuple(data_shape)).round()
    lp = lik.log_prob(params, x)
    assert lp.shape == (BATCH,), f"likelihood {info.name!r}: log_prob shape {tuple(lp.shape)}, expected ({BATCH},)"
    assert torch.isfinite(lp).all(), f"likelihood {info.name!r}: non-finite log_prob"
    lp.sum().backward()
    assert params.grad is not None and torch.isfinite(params.grad).all()
    assert lik.mean(params).shape == (BATCH,) + tuple(data_shape), f"likelihood {info.name!r}: mean has the wrong shape"
    return lik


def check_regularizer(info: PluginInfo, latent_dim: int = 4, data_shape: tuple[int, ...] = (1, 6, 6)) -> Regularizer:
    """The regularizer inside a small composed VAE: bound, its own optimizer stepped, its penalty in the loss."""
    reg = _build(info, latent_dim=latent_dim, data_shape=data_shape)
    assert isinstance(reg, Regularizer), f"regularizer {info.name!r} must subclass vaekit.Regularizer"
    assert isinstance(reg.supports_distributed, bool), f"regularizer {info.name!r}: supports_distributed must be a bool"
    x = torch.rand((BATCH,) + tuple(data_shape))
    assert reg.corrupt(x).shape == x.shape, f"regularizer {info.name!r}: corrupt changed the shape"
    z = torch.randn(BATCH, latent_dim, requires_grad=True)
    assert reg.transform_latent(z).shape == z.shape, f"regularizer {info.name!r}: transform_latent changed the shape"
    assert reg.transform_features(z).shape == z.shape, f"regularizer {info.name!r}: transform_features changed the shape"
    model = composed_model(regularizers=[reg], latent_dim=latent_dim, data_shape=data_shape)
    record = _train_step(model, info, "regularizer")
    penalty = reg.penalty(record)
    if penalty is not None:
        assert penalty.dim() == 0 and torch.isfinite(penalty), f"regularizer {info.name!r}: penalty must be a finite scalar"
    # under torchrun a rank's share of a batch may be one sample: its loss terms must have the same names
    one = reg.penalty(model(torch.rand((1,) + tuple(data_shape)).round()))
    assert (one is None) == (penalty is None), (
        f"regularizer {info.name!r}: penalty is {'None' if one is None else 'a tensor'} for a batch of one sample but "
        f"{'None' if penalty is None else 'a tensor'} for {BATCH}: return a tensor (or None) for every batch")
    _export_or_refuse(model, info, "regularizer")
    return reg


def check_objective(info: PluginInfo, latent_dim: int = 4, data_shape: tuple[int, ...] = (1, 6, 6),
                    epochs: int = 4) -> Objective:
    """The objective on a small composed VAE with a penalty-giving regularizer: bound, each epoch's
    logged values finite, a finite scalar loss with ``terms["loss"]`` equal to it and the penalty
    inside it, finite gradients."""
    from .config import RunConfig
    from .plugins.regularizers import Sparsity

    objective = _build(info, config=RunConfig(epochs=epochs))
    assert isinstance(objective, Objective), f"objective {info.name!r} must subclass vaekit.Objective"
    model = composed_model(regularizers=[Sparsity(latent_dim, data_shape)], latent_dim=latent_dim,
                           data_shape=data_shape)
    objective.bind(model)
    for epoch in range(1, epochs + 1):
        logged = objective.set_epoch(epoch)
        assert all(isinstance(v, float) and torch.isfinite(torch.tensor(v)) for v in logged.values()), (
            f"objective {info.name!r}: set_epoch({epoch}) logged {logged}")
    torch.manual_seed(0)
    x = torch.rand((BATCH,) + model.data_shape).round()
    record = objective.forward(model, x)
    loss, terms = objective.loss(model, record)
    assert loss.dim() == 0 and torch.isfinite(loss), f"objective {info.name!r}: loss {terms} is not a finite scalar"
    assert terms.get("loss") is loss, f"objective {info.name!r}: terms['loss'] must be the loss"
    own, _ = objective.terms(model, record)
    assert (loss - own).item() > 0, f"objective {info.name!r}: the regularizer's penalty is not part of the loss"
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"objective {info.name!r}: non-finite gradient of {name}"
    return objective


def check_dataset(info: PluginInfo, **options) -> DataBundle:
    """Build the dataset with its defaults overridden by ``options`` and validate the bundle."""
    defaults = {name: opt.default for name, opt in info.options.items()}
    bundle = info.factory(**{**defaults, **options})
    assert isinstance(bundle, DataBundle), f"dataset {info.name!r} must return a DataBundle"
    bundle.validate()
    assert bundle.train_x.dtype == torch.float32 and bundle.test_x.dtype == torch.float32
    return bundle


CHECKS = {
    "encoder": check_encoder,
    "decoder": check_decoder,
    "prior": check_prior,
    "likelihood": check_likelihood,
    "regularizer": check_regularizer,
    "objective": check_objective,
    "dataset": check_dataset,
}
