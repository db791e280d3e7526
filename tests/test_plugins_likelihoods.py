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
