"""The likelihood plugins do what they exist for (the MCC likelihood is robust to outliers)."""

import math

import numpy as np
import pytest
import torch

import vaekit
from vaekit.data import load_mnist5k
from vaekit.errors import ConfigError
from vaekit.evaluation import evaluate, iwae_log_likelihood, reconstruction_error
from vaekit.manager import get_plugin_manager

PM = get_plugin_manager()


def test_mcc_matches_the_correntropy_formula():
    lik = PM.likelihoods.build(vaekit.PluginSpec("mcc", {"sigma": "0.5"}), data_shape=(3,))
    x, xhat = torch.tensor([[0.0, 1.0, 0.2]]), torch.tensor([[0.0, 0.0, 0.7]])
    k = lambda a: math.exp(-a * a / (2 * 0.25)) / (math.sqrt(2 * math.pi) * 0.5)  # noqa: E731
    assert torch.allclose(lik.log_prob(xhat, x), torch.tensor([k(0.0) + k(1.0) + k(0.5)]))
    # outliers saturate: the gradient of a huge error is (nearly) zero, unlike squared error
    big = torch.tensor([[50.0]], requires_grad=True)
    PM.likelihoods.build(vaekit.PluginSpec("mcc"), data_shape=(1,)).log_prob(big, torch.zeros(1, 1)).sum().backward()
    assert abs(float(big.grad)) < 1e-12
    assert not lik.normalized


def _gaussian(**options):
    return PM.likelihoods.build(vaekit.PluginSpec("gaussian", {k: str(v) for k, v in options.items()}), data_shape=(2,))


def test_fixed_gaussian_sigma_is_used_as_given_even_below_min_sigma():
    lik = PM.likelihoods.build(vaekit.PluginSpec("gaussian", {"sigma": "0.005"}), data_shape=(1, 2, 3))
    g = torch.Generator().manual_seed(0)
    mean = torch.rand(4, 1, 2, 3, generator=g)
    x = mean + 0.01 * torch.randn(4, 1, 2, 3, generator=g)
    expected = torch.distributions.Normal(mean.double(), 0.005).log_prob(x.double()).flatten(1).sum(1)
    assert torch.allclose(lik.log_prob(mean, x).double(), expected, rtol=1e-5)


def _fit_sigma(lik, residuals, steps):
    """Maximise the mean log-likelihood of ``residuals`` around a zero mean over σ with Adam (lr decayed 100x)."""
    opt = torch.optim.Adam(lik.parameters(), lr=0.05)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, 0.01 ** ((2 * t - steps) / steps)))
    zero = torch.zeros_like(residuals)
    for _ in range(steps):
        opt.zero_grad()
        (-lik.log_prob(zero, residuals).mean()).backward()
        opt.step()
        decay.step()
    return lik.sigma().detach()


def _rms(residuals):
    # the maximum-likelihood σ of N(0, σ²) for each data dimension
    return torch.from_numpy(np.sqrt(np.mean(residuals.double().numpy() ** 2, axis=0))).float()


def test_learned_gaussian_sigma_converges_to_the_maximum_likelihood_sigma():
    residuals = torch.randn(500, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([0.3, 0.02])
    sigma = _fit_sigma(_gaussian(sigma=0.1, learn_sigma=True, min_sigma=0.01), residuals, 400)
    assert torch.allclose(sigma, _rms(residuals), rtol=1e-3), (sigma, _rms(residuals))


def test_learned_gaussian_sigma_that_reached_its_floor_can_rise_again():
    g = torch.Generator().manual_seed(2)
    lik = _gaussian(sigma=0.05, learn_sigma=True, min_sigma=0.01)
    # residuals far smaller than the floor drive σ down to min_sigma (its constrained maximum-likelihood value) ...
    assert (_fit_sigma(lik, 0.002 * torch.randn(500, 2, generator=g), 200) < 0.012).all()
    # ... and once the residuals grow, σ must still follow them (a clamped σ would stay at the floor)
    residuals = torch.randn(500, 2, generator=g) * torch.tensor([0.02, 0.05])
    sigma = _fit_sigma(lik, residuals, 400)
    assert torch.allclose(sigma, _rms(residuals), rtol=1e-3), (sigma, _rms(residuals))
    assert (sigma > 0.01).all()


def test_learned_gaussian_sigma_must_start_above_its_floor():
    with pytest.raises(ConfigError, match="must be above its floor min_sigma=0.01"):
        _gaussian(sigma=0.01, learn_sigma=True, min_sigma=0.01)


@pytest.fixture(scope="module")
def corrupted_mnist(tmp_path_factory):
    """1,000 real training digits, 10% of them replaced by Gaussian noise N(0.5, 1); clean test digits."""
    d = load_mnist5k(100, 20)
    g = torch.Generator().manual_seed(0)
    x = d.train_x.clone()
    idx = torch.randperm(len(x), generator=g)[: len(x) // 10]
    x[idx] = 0.5 + torch.randn((len(idx),) + x.shape[1:], generator=g)
    path = tmp_path_factory.mktemp("corrupt") / "mnist_10pct_noise.npz"
    np.savez(path, x_train=x.numpy(), x_test=d.test_x.numpy())
    return path, d.test_x


def test_mcc_beats_squared_error_on_corrupted_training_data(corrupted_mnist, tmp_path):
    path, clean_test = corrupted_mnist
    errors = {}
    for lik in ("mcc", "gaussian"):
        run = vaekit.train(data=str(path), encoder="mlp:hidden=256", prior="none", likelihood=lik, latent_dim=16,
                           epochs=10, batch_size=64, out=str(tmp_path / lik), quiet=True, figures=False)
        errors[lik] = float(reconstruction_error(run.model, clean_test).mean())
    # seen: mcc 0.031, squared error 0.038 mean squared error per pixel on the clean test digits
    assert errors["mcc"] < 0.9 * errors["gaussian"], errors


def test_mcc_runs_are_labelled_as_losses_not_nats(tmp_path):
    run = vaekit.train(data="mnist:train_per_class=10,test_per_class=2", encoder="mlp:hidden=32", likelihood="mcc",
                       latent_dim=2, epochs=1, out=str(tmp_path / "r"), quiet=True, figures=False)
    assert "test_loss_recon" in run.metrics and "test_elbo" not in run.metrics
    x = load_mnist5k(10, 2).test_x
    out = evaluate(run.model, x, nll_samples=10)
    assert "loss_recon" in out and "nll" not in out and "elbo" not in out and "kl" in out
    with pytest.raises(ConfigError, match="not a normalised density"):
        iwae_log_likelihood(run.model, x, 10)


def test_bernoulli_log_prob_is_torch_distributions_in_value_and_gradient():
    """The Bernoulli likelihood's own log_prob against Independent(Bernoulli(logits)).log_prob, with broadcasting
    ([k, B, *S] logits against [B, *S] data, as the importance sampler passes them) and on grey levels."""
    from torch.distributions import Bernoulli, Independent

    from vaekit.plugins.likelihoods import BernoulliLikelihood

    torch.manual_seed(0)
    lik = BernoulliLikelihood((1, 4, 3))
    logits = (3 * torch.randn(5, 2, 1, 4, 3)).requires_grad_()
    for x in (torch.rand(2, 1, 4, 3).bernoulli(), torch.rand(2, 1, 4, 3)):
        ours = lik.log_prob(logits, x)
        ref = Independent(Bernoulli(logits=logits, validate_args=False), 3).log_prob(x)
        assert ours.shape == ref.shape == (5, 2)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
        g_ours, = torch.autograd.grad(ours.sum(), logits)
        g_ref, = torch.autograd.grad(ref.sum(), logits)
        torch.testing.assert_close(g_ours, g_ref)
