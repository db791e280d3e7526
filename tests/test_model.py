import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaekit import PluginSpec
from vaekit.config import RunConfig
from vaekit.errors import ConfigError
from vaekit.manager import get_plugin_manager
from vaekit.model import build_model
from vaekit.ops import reparameterize_kl

PM = get_plugin_manager()


def test_reparameterize_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar, eps = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    z, kl = reparameterize_kl(mu, logvar, eps)
    std = torch.exp(0.5 * logvar)
    ref = kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl, ref)
    assert torch.allclose(z, mu + std * eps)
    with pytest.raises(ValueError, match="mu \\(5, 7\\).*logvar \\(5, 6\\)"):
        reparameterize_kl(mu, logvar[:, :6])


def test_gaussian_prior_kl_is_nonnegative_and_zero_at_the_prior():
    prior = PM.priors.build(PluginSpec("gaussian"), latent_dim=3)
    params = torch.zeros(4, 6)  # mu = 0, log var = 0
    _, kl = prior.rsample_kl(params)
    assert torch.allclose(kl, torch.zeros(4))
    _, kl = prior.rsample_kl(torch.randn(4, 6))
    assert (kl > 0).all()


def test_bernoulli_log_prob_matches_the_formula():
    lik = PM.likelihoods.build(PluginSpec("bernoulli"), data_shape=(1, 2, 2))
    logits = torch.tensor([[[[2.0, -1.0], [0.0, 30.0]]]])
    x = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    p = torch.sigmoid(logits.double())
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum().float()
    assert torch.allclose(lik.log_prob(logits, x), expected.view(1), atol=1e-6)
    # stable for extreme logits: no -inf
    assert torch.isfinite(lik.log_prob(torch.full((1, 1, 2, 2), -200.0), torch.ones(1, 1, 2, 2))).all()


def test_gaussian_likelihood_matches_the_formula():
    lik = PM.likelihoods.build(PluginSpec("gaussian", {"sigma": "0.5"}), data_shape=(3,))
    mean, x = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[0.5, 1.0, 0.0]])
    expected = (-(x - mean) ** 2 / (2 * 0.25) - math.log(0.5) - 0.5 * math.log(2 * math.pi)).sum()
    assert torch.allclose(lik.log_prob(mean, x), expected.view(1))
    assert not list(lik.parameters())


def test_conv_model_on_any_size_divisible_by_four():
    cfg = RunConfig(encoder="conv", latent_dim=3, likelihood="gaussian")
    model = build_model(cfg, (3, 8, 12), PM)
    rec = model(torch.rand(2, 3, 8, 12))
    assert rec.z.shape == (2, 3) and rec.log_px.shape == (2,) and rec.kl.shape == (2,)
    assert model.sample(4).shape == (4, 3, 8, 12)


@pytest.mark.parametrize("shape,message", [((784,), "needs image data"), ((1, 30, 30), "divisible by 4")])
def test_conv_rejects_incompatible_data(shape, message):
    with pytest.raises(ConfigError, match=message):
        build_model(RunConfig(encoder="conv"), shape, PM)


def test_deterministic_autoencoder_has_no_kl_and_no_samples():
    model = build_model(RunConfig(encoder="mlp", prior="none", latent_dim=5), (1, 28, 28), PM)
    rec = model(torch.rand(3, 1, 28, 28))
    assert torch.equal(rec.kl, torch.zeros(3))
    loss, terms = model.loss(rec, beta=10.0)
    assert torch.allclose(loss, terms["recon"])
    with pytest.raises(ConfigError, match="no prior distribution"):
        model.sample(2)


def test_loss_is_recon_plus_beta_kl():
    torch.manual_seed(0)
    model = build_model(RunConfig(encoder="mlp", latent_dim=4), (1, 28, 28), PM)
    rec = model(torch.rand(6, 1, 28, 28).round())
    loss, terms = model.loss(rec, beta=2.5)
    assert torch.allclose(loss, -rec.log_px.mean() + 2.5 * rec.kl.mean())
    assert set(terms) == {"loss", "recon", "kl"}


def test_latent_dim_below_one_is_rejected():
    with pytest.raises(ConfigError, match="latent-dim must be at least 1"):
        RunConfig(latent_dim=0)


def _linear_shapes(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def test_the_default_decoder_mirrors_the_encoder():
    """No --decoder: the decoder's layers are the encoder's (and the head's) transposed, in reverse
    order, with the encoder's activation; an explicit --decoder wins."""
    from vaekit.model import decoder_spec

    cfg = RunConfig(encoder="mlp:hidden=500,500,2000,activation=tanh", prior="none", latent_dim=10)
    model = build_model(cfg, (1, 28, 28), PM)
    encoder = _linear_shapes(model.encoder) + _linear_shapes(model.head)
    assert encoder == [(784, 500), (500, 500), (500, 2000), (2000, 10)]
    assert _linear_shapes(model.decoder) == [(b, a) for a, b in reversed(encoder)]
    assert {type(m) for m in model.decoder.modules() if not isinstance(m, (torch.nn.Linear, torch.nn.Sequential))} \
        <= {torch.nn.Tanh, type(model.decoder)}
    assert decoder_spec(cfg, PM) == PluginSpec("mlp", {"hidden": (2000, 500, 500), "activation": "tanh"})

    conv = build_model(RunConfig(encoder="conv:channels=16,32,hidden=64", latent_dim=3), (1, 28, 28), PM)
    convs = [(m.in_channels, m.out_channels) for m in conv.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    deconvs = [(m.in_channels, m.out_channels) for m in conv.decoder.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert convs == [(1, 16), (16, 32)] and deconvs == [(32, 16), (16, 1)]
    assert _linear_shapes(conv.decoder) == [(3, 64), (64, 32 * 7 * 7)]

    explicit = build_model(RunConfig(encoder="mlp:hidden=500,2000", decoder="mlp:hidden=32", latent_dim=2), (1, 28, 28), PM)
    assert _linear_shapes(explicit.decoder) == [(2, 32), (32, 784)]


def test_mirror_leaves_out_an_option_the_decoder_cannot_take():
    """A third-party pair whose same-named options differ in type: the decoder keeps its default."""
    import vaekit
    from vaekit.manager import PluginManager
    from vaekit.model import decoder_spec

    class Enc(vaekit.Encoder):
        """Test encoder.

        :param width: a name.
        :param depth: layers.
        """

        def __init__(self, input_shape, *, width: str = "wide", depth: int = 3):
            super().__init__(input_shape)
            self.out_features = 4

    class Plugin:
        @vaekit.hookimpl
        def vaekit_register_encoders(self, registry):
            registry.register("pair", Enc)

        @vaekit.hookimpl
        def vaekit_register_decoders(self, registry):
            registry.register("pair", lambda latent_dim, output_shape, *, width=8, depth=1: None)

    pm = PluginManager(extra_plugins=[Plugin()], autoload=False)
    assert decoder_spec(RunConfig(encoder="pair"), pm) == PluginSpec("pair", {"depth": 3})
