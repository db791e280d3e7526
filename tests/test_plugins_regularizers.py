"""The regularizer plugins do what they exist for, on the real MNIST digits."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vaekit
from vaekit.data import load_mnist5k
from vaekit.ops import mmd2_unbiased

DATA = "mnist:train_per_class=100,test_per_class=20"
COMMON = dict(data=DATA, encoder="mlp:hidden=256", batch_size=64, quiet=True, figures=False)


@pytest.fixture(scope="module")
def test_digits():
    return load_mnist5k(100, 20).test_x


# --- the MMD estimator ---------------------------------------------------------------------------

def test_mmd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 4, generator=g)
    same = mmd2_unbiased(x, torch.randn(500, 4, generator=g), "imq", (8.0,))
    assert abs(float(same)) < 0.005
    values = [float(mmd2_unbiased(x, torch.randn(500, 4, generator=g) + shift, "imq", (8.0,)))
              for shift in (0.25, 0.5, 1.0, 2.0)]
    assert values[0] > 0.01 and values == sorted(values)
    rbf = [float(mmd2_unbiased(x, torch.randn(500, 4, generator=g) + s, "rbf", (8.0,))) for s in (0.0, 1.0)]
    assert abs(rbf[0]) < 0.005 < rbf[1]


def test_mmd_is_unbiased():
    """Averaged over many small samples from one distribution, the estimate is 0 (the biased V-statistic is not)."""
    g = torch.Generator().manual_seed(1)
    estimates = torch.stack([mmd2_unbiased(torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g))
                             for _ in range(2000)])
    assert abs(float(estimates.mean())) < 3 * float(estimates.std()) / 2000**0.5


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2 points"):
        mmd2_unbiased(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"\[n, d\] and \[m, d\]"):
        mmd2_unbiased(torch.zeros(4, 3), torch.zeros(5, 2))


# --- every regularizer ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,shown", [("sparsity:weight=-1", "-1.0"), ("mmd:weight=nan", "nan"),
                                        ("contractive:weight=inf", "inf"), ("adversarial:weight=-0.5", "-0.5")])
def test_a_weight_must_be_finite_and_not_negative(spec, shown):
    """A negative weight rewards the penalty, a non-finite one breaks the loss: one error naming the regularizer."""
    from vaekit.config import RunConfig
    from vaekit.errors import ConfigError
    from vaekit.manager import get_plugin_manager
    from vaekit.model import build_model

    name = spec.split(":")[0]
    with pytest.raises(ConfigError, match=rf"^{name}: weight must be a finite number >= 0, got {shown}$"):
        build_model(RunConfig(encoder="mlp:hidden=8", prior="none", latent_dim=3, regularizers=[spec]), (1, 5, 5),
                    get_plugin_manager())


# --- sparsity ------------------------------------------------------------------------------------

def test_sparse_autoencoder_codes_are_sparse(tmp_path, test_digits):
    """Ng 2011: the codes the decoder reads (model.embed, sigmoid units) have mean ≈ ρ and most entries near 0;
    the same sigmoid-coded AE without the penalty (weight=0) has dense codes."""
    def codes(run):
        with torch.no_grad():
            return run.model.eval().embed(test_digits)

    kw = dict(prior="none", latent_dim=200, epochs=10, **COMMON)
    sparse = codes(vaekit.train(regularizers=["sparsity:rho=0.05"], out=str(tmp_path / "sparse"), **kw))
    dense = codes(vaekit.train(regularizers=["sparsity:weight=0"], out=str(tmp_path / "dense"), **kw))
    assert abs(float(sparse.mean()) - 0.05) < 0.015        # seen: 0.052 (seeds 1, 2: 0.056, 0.057)
    assert float((sparse < 0.05).float().mean()) > 0.55     # seen: 0.66 (seeds 1, 2: 0.62, 0.61; 0.71 after 15 epochs)
    assert float(dense.mean()) > 0.3                        # seen: 0.52 (seeds 1, 2: 0.50, 0.52)
    assert float((dense < 0.05).float().mean()) < 0.3       # seen: 0.12 (seeds 1, 2: 0.09, 0.12)


# --- contractive AE ------------------------------------------------------------------------------

def reference_jacobian_sq(f, x):
    """‖∂f(x_b)/∂x_b‖²_F per sample from torch.autograd.functional.jacobian, one sample at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda xb: f(xb.unsqueeze(0)).squeeze(0), xb,
                                                            create_graph=True).square().sum() for xb in x])


def _code_jacobians(model, x):
    """Per-sample Jacobians ``[n, d, D]`` of the code (``model.code``) w.r.t. the input, by the reference Jacobian."""
    model.eval()
    return torch.stack([torch.autograd.functional.jacobian(lambda xb: model.code(xb.unsqueeze(0)).squeeze(0), xb)
                        .flatten(1) for xb in x])


def test_contractive_autoencoder_has_a_flatter_code(tmp_path, test_digits, plain_ae):
    """Rifai et al. 2011: penalising ‖J_f(x)‖²_F makes the code contract around the data; at equal epochs the test
    digits' mean ‖J‖_F is at least 2× lower than the plain AE's (plain_ae: the same config without the penalty).

    With an untied decoder most of that is scale: the decoder absorbs a smaller code (its spread, the norm of the
    per-unit standard deviations over the test digits, seen 3.7 vs 10.1).  Standardizing each code unit by its
    standard deviation over the test digits removes the scale; the CAE's standardized Jacobian is still lower, by a
    smaller factor (seen 1.77 vs 2.20; seeds 1, 2: 1.73 vs 2.26, 1.75 vs 2.29, ratios 0.76-0.80; the factor stays
    there for weights 0.3 to 10, which move the raw ‖J‖_F from 3.6 to 0.8)."""
    cae = vaekit.train(prior="none", latent_dim=8, epochs=20, regularizers=["contractive"], out=str(tmp_path / "c"),
                       **COMMON)
    x = test_digits[::4][:50]
    jacobians = {name: _code_jacobians(run.model, x) for name, run in (("cae", cae), ("plain", plain_ae))}
    raw = {name: float(j.flatten(1).norm(dim=1).mean()) for name, j in jacobians.items()}
    assert raw["cae"] < 0.5 * raw["plain"]  # seen: 2.27 vs 7.87 (seeds 1, 2: 2.28 vs 7.91, 2.25 vs 7.71)
    standardized = {}
    for name, run in (("cae", cae), ("plain", plain_ae)):
        with torch.no_grad():
            std = run.model.code(test_digits).std(0)  # [d], per code unit over the test digits
        standardized[name] = float((jacobians[name] / std[:, None]).flatten(1).norm(dim=1).mean())
    assert standardized["cae"] < 0.9 * standardized["plain"], standardized
    assert "train_contractive" in cae.metrics


# --- adversarial and MMD latent matching ----------------------------------------------------------

def _mmd_to_prior(run, x):
    with torch.no_grad():
        z = run.model.embed(x)
    ref = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    return float(mmd2_unbiased(z, ref, "imq", (2.0 * z.shape[1],)))


@pytest.fixture(scope="module")
def plain_ae(tmp_path_factory):
    return vaekit.train(prior="none", latent_dim=8, epochs=20, out=str(tmp_path_factory.mktemp("ae") / "r"), **COMMON)


def test_adversarial_autoencoder_matches_the_prior(tmp_path, test_digits, plain_ae):
    aae = vaekit.train(prior="none", latent_dim=8, epochs=20, regularizers=["adversarial"], out=str(tmp_path / "aae"),
                       **COMMON)
    assert {"train_adversarial", "train_adversarial_d_loss", "train_adversarial_d_acc"} <= set(aae.metrics)
    assert _mmd_to_prior(aae, test_digits) < 0.5 * _mmd_to_prior(plain_ae, test_digits)  # seen: 0.15 vs 0.39


def test_wae_mmd_matches_the_prior(tmp_path, test_digits, plain_ae):
    wae = vaekit.train(prior="none", latent_dim=8, epochs=20, regularizers=["mmd"], out=str(tmp_path / "wae"), **COMMON)
    assert _mmd_to_prior(wae, test_digits) < 0.2 * _mmd_to_prior(plain_ae, test_digits)  # seen: 0.02 vs 0.39


def test_latent_matching_models_can_sample_and_write_samples_png(tmp_path):
    run = vaekit.train(prior="none", latent_dim=2, epochs=1, regularizers=["mmd"], out=str(tmp_path / "w"),
                       **{**COMMON, "figures": True, "data": "mnist:train_per_class=10,test_per_class=2"})
    assert (run.run_dir / "samples.png").exists() and (run.run_dir / "manifold.png").exists()
    model = vaekit.load_run(run.run_dir)
    a = model.sample(4, torch.Generator().manual_seed(3))
    b = model.sample(4, torch.Generator().manual_seed(3))
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b)


def test_mmd_with_gaussian_prior_adds_to_kl_unless_beta_is_zero(tmp_path):
    kw = dict(COMMON, data="mnist:train_per_class=10,test_per_class=2", latent_dim=4, epochs=1)
    run = vaekit.train(regularizers=["mmd:weight=3"], out=str(tmp_path / "a"), **kw)
    m = run.metrics
    assert m["train_loss"] == pytest.approx(m["train_recon"] + m["train_kl"] + 3 * m["train_mmd"], rel=1e-4)
    run = vaekit.train(regularizers=["mmd:weight=3"], beta=0.0, out=str(tmp_path / "b"), **kw)
    m = run.metrics
    assert m["train_loss"] == pytest.approx(m["train_recon"] + 3 * m["train_mmd"], rel=1e-4)


def test_several_regularizers_are_logged_separately(tmp_path):
    run = vaekit.train(prior="none", latent_dim=4, epochs=1, regularizers=["sparsity", "mmd:weight=10", "mmd:kernel=rbf"],
                       out=str(tmp_path / "r"), **dict(COMMON, data="mnist:train_per_class=10,test_per_class=2"))
    line = json.loads((run.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_sparsity", "train_mmd", "train_mmd_2"} <= set(line)


def test_adversarial_run_resumes_exactly_with_its_discriminator(tmp_path):
    kw = dict(COMMON, data="mnist:train_per_class=20,test_per_class=2", prior="none", latent_dim=4,
              regularizers=["adversarial:width=32"])
    full = vaekit.train(epochs=2, out=str(tmp_path / "full"), **kw)
    vaekit.train(epochs=1, out=str(tmp_path / "part"), **kw)
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    w1, w2 = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert any(k.startswith("regularizers.0.discriminator") for k in w1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    state = load_file(resumed.run_dir / "trainer_state.safetensors")
    assert any(k.startswith("optim.regularizer0.") for k in state)
