import pytest
import torch

import vaekit
from vaekit.errors import ConfigError
from vaekit.evaluation import elbo_terms, evaluate, iwae_log_likelihood, reconstruction_error


@pytest.fixture(scope="module")
def model_and_data(trained_run, small_mnist):
    model = vaekit.load_run(trained_run)
    x = torch.bernoulli(small_mnist.test_x, generator=torch.Generator().manual_seed(0))
    return model, x


def test_iwae_with_one_sample_is_the_elbo_in_expectation(model_and_data):
    model, x = model_and_data
    torch.manual_seed(0)
    elbo = torch.stack([elbo_terms(model, x)["elbo"] for _ in range(20)]).mean()
    iw1 = torch.stack([iwae_log_likelihood(model, x, num_samples=1) for _ in range(20)]).mean()
    assert abs(float(elbo - iw1)) < 0.01 * abs(float(elbo))


def test_importance_sampling_tightens_the_bound(model_and_data):
    model, x = model_and_data
    torch.manual_seed(0)
    k1 = iwae_log_likelihood(model, x, num_samples=1).mean()
    k50 = iwae_log_likelihood(model, x, num_samples=50).mean()
    k500 = iwae_log_likelihood(model, x, num_samples=500, max_rows=512).mean()
    assert k1 < k50 < k500  # Burda et al. 2015, theorem 1: the bound grows with K


def test_chunking_does_not_change_the_estimate(model_and_data):
    model, x = model_and_data
    torch.manual_seed(1)
    a = iwae_log_likelihood(model, x[:10], num_samples=64, max_rows=10_000)
    torch.manual_seed(1)
    b = iwae_log_likelihood(model, x[:10], num_samples=64, batch_size=10, max_rows=10_000)
    assert torch.allclose(a, b)


def test_evaluate_summary(model_and_data):
    model, x = model_and_data
    out = evaluate(model, x, nll_samples=20)
    assert out["n"] == len(x)
    assert out["nll"] <= -out["elbo"] + 1.0
    assert 0 < out["recon_mse"] < 0.2
    assert abs(out["elbo"] - (out["log_px"] - out["kl"])) < 1e-3


def test_reconstruction_error_is_lower_for_training_like_data(model_and_data):
    model, x = model_and_data
    noise = torch.rand_like(x).round()
    assert reconstruction_error(model, x).mean() < reconstruction_error(model, noise).mean()


def test_nll_is_refused_for_a_deterministic_autoencoder(tmp_path):
    from vaekit.config import RunConfig
    from vaekit.manager import get_plugin_manager
    from vaekit.model import build_model

    model = build_model(RunConfig(encoder="mlp", prior="none"), (1, 28, 28), get_plugin_manager())
    with pytest.raises(ConfigError, match="deterministic autoencoder"):
        iwae_log_likelihood(model, torch.rand(2, 1, 28, 28), 5)
    out = evaluate(model, torch.rand(4, 1, 28, 28).round(), nll_samples=5)
    assert "nll" not in out and "elbo" not in out and "log_px" in out
