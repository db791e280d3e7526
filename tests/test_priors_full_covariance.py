"""The full-covariance Gaussian posterior (``--prior gaussian:covariance=full``; Kingma & Welling 2019, §2.5.5):
KL, log q and samples against torch.distributions and closed forms, gradients, the diagonal special case,
training on the bundled digits, and the CLI (train, resume, eval, sample, embed)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import MultivariateNormal, kl_divergence
from typer.testing import CliRunner

import vaekit
from vaekit.cli import build_app
from vaekit.errors import ConfigError
from vaekit.plugins.priors import GaussianPrior

D = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These small models train ~20x faster on one thread than on two on a loaded 2-core machine
    (OpenMP workers wait on each other); the results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(batch, d, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, 2 * d + d * (d - 1) // 2, generator=g, dtype=dtype)


def _reference_tril(params, d):
    """L built entry by entry from the documented layout [μ, log σ², L_10, L_20, L_21, L_30, ...], log σ² clamped
    to [−30, 30]."""
    logvar = params[:, d : 2 * d].clamp(-30, 30)
    L = torch.zeros(params.shape[0], d, d, dtype=params.dtype)
    k = 2 * d
    for i in range(d):
        L[:, i, i] = torch.exp(0.5 * logvar[:, i])
        for j in range(i):
            L[:, i, j] = params[:, k]
            k += 1
    return L


def _extreme_params(d):
    """Random params with log σ² and L′ far out: log σ² beyond the clamp (±40), σ tiny or huge, entries ±100."""
    p = _params(64, d, seed=1, scale=3.0)
    p[:8, d : 2 * d] = 40.0 * torch.sign(torch.randn(8, d, generator=torch.Generator().manual_seed(2)))
    p[8:16, 2 * d :] *= 30.0
    p[16:24, :d] *= 50.0
    return p


@pytest.mark.parametrize("d", [1, 2, D, 7])
@pytest.mark.parametrize("kind", ["moderate", "extreme"])
def test_kl_and_log_q_agree_with_torch_distributions(d, kind):
    prior = GaussianPrior(d, covariance="full")
    params = _params(64, d) if kind == "moderate" else _extreme_params(d)
    L = _reference_tril(params, d)
    mu = params[:, :d]
    eps = torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    z, kl = prior.rsample_kl_full(params, eps)
    assert z.shape == (64, d) and kl.shape == (64,)
    reference = MultivariateNormal(mu, scale_tril=L)
    standard = MultivariateNormal(torch.zeros(d, dtype=torch.float64), scale_tril=torch.eye(d, dtype=torch.float64))
    assert torch.allclose(kl, kl_divergence(reference, standard), rtol=1e-9, atol=1e-9)
    assert torch.allclose(z, mu + (L @ eps.unsqueeze(-1)).squeeze(-1), rtol=1e-12, atol=1e-9)
    q = prior.posterior(params)
    assert q.batch_shape == (64,) and q.event_shape == (d,) and torch.equal(q.mean, mu)
    assert torch.equal(q.scale_tril, L)
    # log q(z|x) = −Σ_i ½(ε_i² + log 2π) − Σ_i log L_ii (METHODS.md), at z = μ + Lε.  With σ ~ e⁻¹⁵ next to
    # entries ~ 100 (cond(L) up to 1e20) ε cannot be recovered from z in float64, so the extreme case checks
    # the density at the mode z = μ (ε = 0), where nothing cancels
    log_det = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if kind == "moderate":
        log_q = -0.5 * (eps.square() + math.log(2 * math.pi)).sum(-1) - log_det
        assert torch.allclose(q.log_prob(z), log_q, rtol=1e-9, atol=1e-9)
    assert torch.allclose(q.log_prob(mu), -0.5 * d * math.log(2 * math.pi) - log_det, rtol=1e-9, atol=1e-9)
    # float32 params: the same values to float32 precision, every one finite
    z32, kl32 = prior.rsample_kl_full(params.float(), eps.float())
    assert torch.isfinite(kl32).all() and torch.isfinite(z32).all()
    assert torch.allclose(kl32.double(), kl, rtol=1e-4) and torch.allclose(z32.double(), z, rtol=1e-4, atol=1e-3)


def test_samples_have_covariance_LLT():
    """z = μ + Lε over many draws (torch's global RNG, seeded): mean μ and covariance LLᵀ."""
    prior = GaussianPrior(3, covariance="full")
    params = torch.tensor([0.5, -1.0, 2.0, 0.2, -0.6, 1.0, 0.9, -1.5, 0.4])  # L_10 = 0.9, L_20 = −1.5, L_21 = 0.4
    n = 200_000
    torch.manual_seed(0)
    z, _ = prior.rsample_kl(params.expand(n, -1))
    L = _reference_tril(params[None].double(), 3)[0]
    cov = torch.from_numpy(np.cov(z.double().numpy(), rowvar=False))
    sigma = L @ L.T
    # seen (seeds 0-2): max |cov − LLᵀ| = 0.011, 0.016, 0.007 with entries up to 5.1; max |mean − μ| = 0.004, 0.002, 0.003
    assert (cov - sigma).abs().max() < 0.05
    assert (z.double().mean(0) - params[:3].double()).abs().max() < 0.015
    # corr(z_0, z_1) = Σ_01 / √(Σ_00 Σ_11) = 0.772; seen 0.771, 0.774, 0.772
    assert abs(np.corrcoef(z[:, 0].numpy(), z[:, 1].numpy())[0, 1] - sigma[0, 1] / (sigma[0, 0] * sigma[1, 1]).sqrt()) < 0.01


def test_gradients_pass_gradcheck():
    prior = GaussianPrior(D, covariance="full")
    params = _params(3, D).requires_grad_()
    eps = torch.randn(3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert torch.autograd.gradcheck(lambda p: prior.rsample_kl_full(p, eps), (params,))
    assert torch.autograd.gradgradcheck(lambda p: prior.rsample_kl_full(p, eps), (params,))


@pytest.mark.parametrize("fused", [True, False])
def test_zero_off_diagonal_is_the_diagonal_posterior(fused):
    """With L′ = 0 the full posterior is the diagonal one: same z for the same seed, same KL, same log q."""
    full, diagonal = GaussianPrior(D, covariance="full"), GaussianPrior(D, fused=fused)
    params = _params(16, D, dtype=torch.float32)
    params[:, 2 * D :] = 0
    torch.manual_seed(5)
    z_full, kl_full = full.rsample_kl(params)
    torch.manual_seed(5)
    z_diag, kl_diag = diagonal.rsample_kl(params[:, : 2 * D])
    assert torch.allclose(z_full, z_diag, rtol=1e-6, atol=1e-6) and torch.allclose(kl_full, kl_diag, rtol=1e-5)
    q_full, q_diag = full.posterior(params), diagonal.posterior(params[:, : 2 * D])
    assert torch.allclose(q_full.log_prob(z_full), q_diag.log_prob(z_full), rtol=1e-5)
    assert torch.allclose(q_full.variance, q_diag.variance)


def test_bad_covariance_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="covariance.*'banded' must be one of diagonal, full"):
        vaekit.train(data="digits", prior="gaussian:covariance=banded", epochs=1, out=str(tmp_path / "r"), quiet=True)
    with pytest.raises(ConfigError, match="covariance must be 'diagonal' or 'full', got 'banded'"):
        GaussianPrior(3, covariance="banded")
    res = CliRunner().invoke(build_app(), ["run", "--data", "digits", "--prior", "gaussian:covariance=banded",
                                           "--out", str(tmp_path / "c")])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert [line for line in res.stderr.strip().splitlines() if line.startswith("error: ")] == [
        res.stderr.strip().splitlines()[-1]]


DIGITS = dict(data="digits", encoder="mlp:hidden=64", latent_dim=8, epochs=40, batch_size=64, quiet=True, figures=False)


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fullcov")
    return {cov: vaekit.train(prior=f"gaussian:covariance={cov}", out=str(out / cov), **DIGITS)
            for cov in ("diagonal", "full")}


def _test_digits(model, binarized=True):
    """The run's test digits, as evaluation reads them (``binarized``: the fixed test binarization) or as loaded."""
    from vaekit.apply import load_split
    from vaekit.training import eval_inputs

    x, _ = load_split(model, None, "test", None)
    return eval_inputs(x, model.run_info["config"]["binarize"]) if binarized else x


def test_trains_on_digits_and_uses_its_correlations(digits_runs):
    """On the bundled digits (mlp, d = 8, 40 epochs) the full-covariance posterior learns correlated codes that
    the model relies on, and its test ELBO is no worse than the diagonal posterior's."""
    full, diagonal = digits_runs["full"], digits_runs["diagonal"]
    # seen (seeds 0-4): full − diagonal test ELBO = −0.12, +0.07, +0.09, −0.05, +0.04 nats (ELBO ≈ −24.2)
    assert full.metrics["test_elbo"] > diagonal.metrics["test_elbo"] - 0.4
    model = vaekit.load_run(full.run_dir).eval()
    x = _test_digits(model)
    with torch.no_grad():
        params = model.encode(x)
        cov = model.prior.posterior(params).covariance_matrix
        std = cov.diagonal(dim1=-2, dim2=-1).sqrt()
        rows, cols = torch.tril_indices(8, 8, -1)
        corr = (cov / (std.unsqueeze(-1) * std.unsqueeze(-2)))[:, rows, cols].abs()
        # seen (seeds 0-4): mean |correlation| of q(z|x) 0.159, 0.139, 0.159, 0.150, 0.172
        assert corr.mean() > 0.07

        def elbo(p):  # mean over 20 seeded draws per test digit
            torch.manual_seed(0)
            draws = [model.prior.rsample_kl(p) for _ in range(20)]
            return float(torch.stack([model.likelihood.log_prob(model.decode(z), x) - kl for z, kl in draws]).mean())

        uncorrelated = params.clone()
        uncorrelated[:, 16:] = 0
        # seen (seeds 0-4): zeroing the learned off-diagonal L′ costs 0.65, 0.60, 0.77, 0.81, 0.81 nats of ELBO
        assert elbo(params) > elbo(uncorrelated) + 0.3


def test_importance_sampled_nll_with_a_full_posterior(digits_runs):
    """vaekit.evaluate on the full-covariance run: the IWAE bound (K = 200) is tighter than the ELBO, and at K = 1
    the importance weight log p(x|z) + log p(z) − log q(z|x), with z and log q from the posterior's
    MultivariateNormal, averages to the ELBO with the analytic KL of rsample_kl."""
    from vaekit.evaluation import iwae_log_likelihood

    run = digits_runs["full"]
    result = vaekit.evaluate(run.run_dir, nll_samples=200)
    assert result["elbo"] == run.metrics["test_elbo"]
    # seen (seeds 0-2): −elbo 24.37, 24.15, 24.24 and nll 24.10, 23.88, 24.06 (tighter by 0.27, 0.27, 0.17 nats)
    assert -result["elbo"] - 0.05 > result["nll"] > -result["elbo"] - 1.0
    model = vaekit.load_run(run.run_dir).eval()
    x = _test_digits(model)
    torch.manual_seed(0)
    k1 = torch.stack([iwae_log_likelihood(model, x, 1) for _ in range(10)]).mean()
    # seen (seeds 0-2): K = 1 mean − ELBO = −0.006, −0.016, −0.095 nats; −0.88 with a posterior that drops L′
    assert abs(float(k1) - result["elbo"]) < 0.3


def test_cli_trains_resumes_and_applies_a_full_covariance_run(tmp_path):
    """vaekit run --prior gaussian:covariance=full trains, writes its figures, resumes bit-identically, and eval,
    sample and embed work on it."""
    app, runner = build_app(), CliRunner()
    tiny = ["--data", "digits", "--encoder", "mlp:hidden=32", "--prior", "gaussian:covariance=full",
            "--latent-dim", "3", "--batch-size", "64", "--no-progress"]

    def invoke(*args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res

    full, part = tmp_path / "full", tmp_path / "part"
    invoke("run", *tiny, "--epochs", "2", "--out", full)
    invoke("run", *tiny, "--epochs", "1", "--out", part)
    invoke("run", "--resume", part, "--epochs", "2", "--no-progress")
    w1, w2 = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert w1["head.weight"].shape[0] == 2 * 3 + 3  # [μ, log σ², L′]
    m1, m2 = ([json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (full, part))
    assert [m["epoch"] for m in m2] == [1, 2] and m1[1]["test_elbo"] == m2[1]["test_elbo"]
    for name in ("samples.png", "reconstructions.png", "latent.png", "loss.png"):
        assert (full / name).is_file(), name
    info = json.loads((full / "config.json").read_text())
    assert info["config"]["prior"]["options"]["covariance"] == "full"

    report = json.loads(invoke("eval", full, "-k", "20", "--json").stdout)
    assert report["elbo"] == m1[1]["test_elbo"] and math.isfinite(report["nll"])
    invoke("sample", full, "-n", "4", "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").is_file()
    invoke("embed", full, "--out", tmp_path / "e.npy")
    model = vaekit.load_run(full).eval()
    with torch.no_grad():
        expected = model.prior.posterior(model.encode(_test_digits(model, binarized=False))).mean
    assert np.allclose(np.load(tmp_path / "e.npy"), expected.numpy(), atol=1e-6)
