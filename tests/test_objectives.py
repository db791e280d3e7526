"""Training objectives: β schedules and free bits of ``elbo``, the ``iwae`` bound, and their CLI."""

import json

import plugin_for_tests
import pytest
import torch
from safetensors.torch import load_file
from torch.distributions import Normal, kl_divergence

import vaekit
from vaekit.config import RunConfig
from vaekit.errors import ConfigError
from vaekit.evaluation import elbo_terms, iwae_log_likelihood
from vaekit.interfaces import StepOutput
from vaekit.manager import PluginManager
from vaekit.plugins.objectives import ELBO, IWAE
from vaekit.plugins.priors import GaussianPrior
from vaekit.testing import composed_model
from vaekit.training import eval_inputs

from test_cli import assert_one_line_error, invoke

DIGITS = dict(data="digits", encoder="mlp:hidden=64", latent_dim=4, batch_size=64, device="cpu", quiet=True,
              figures=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train fastest on one thread (and do not crowd a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- schedules ------------------------------------------------------------------------------

def test_warmup_is_linear_from_zero_over_n_epochs():
    """Bowman et al. 2016: β_e = β·min(1, (e − 1)/N)."""
    elbo = ELBO(RunConfig(beta=2.0, epochs=6), warmup=4)
    assert [elbo.beta_at(e) for e in range(1, 7)] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_cyclical_schedule_matches_fu_et_al():
    """Fu et al. 2019: T = 10 epochs, M = 2 cycles, R = 0.5: τ = ((e−1) mod 5)/5, β·min(1, τ/R)."""
    elbo = ELBO(RunConfig(beta=1.0, epochs=10), cycles=2)
    assert [elbo.beta_at(e) for e in range(1, 11)] == pytest.approx([0, 0.4, 0.8, 1, 1] * 2)
    # T = 7, M = 2: period 3.5, cycles restart every ceil(3.5) = 4 epochs; R = 0.25
    elbo = ELBO(RunConfig(beta=3.0, epochs=7), cycles=2, ratio=0.25)
    assert [elbo.beta_at(e) for e in range(1, 8)] == pytest.approx([0, 3, 3, 3, 0, 3, 3])
    assert [ELBO(RunConfig(beta=0.5)).beta_at(e) for e in (1, 7)] == [0.5, 0.5]  # the run's --beta, constant


def test_objective_option_errors():
    with pytest.raises(ConfigError, match="give one of them"):
        ELBO(RunConfig(), warmup=2, cycles=2)
    with pytest.raises(ConfigError, match="β is set twice"):
        ELBO(RunConfig(beta=4.0), beta=2.0)
    with pytest.raises(ConfigError, match="free_bits must be"):
        ELBO(RunConfig(), free_bits=-1.0)
    for epochs, cycles in ((3, 4), (10, 10), (6, 4)):  # β would stay 0 (or cycles go missing): refused
        with pytest.raises(ConfigError, match="less than 2 epochs per cycle"):
            ELBO(RunConfig(epochs=epochs), cycles=cycles)
    assert [ELBO(RunConfig(epochs=10), cycles=5).beta_at(e) for e in range(1, 11)] == [0, 1] * 5
    with pytest.raises(ConfigError, match="give them with cycles=M"):
        ELBO(RunConfig(), ratio=0.3)
    with pytest.raises(ConfigError, match="k must be at least 1"):
        IWAE(RunConfig(), k=0)
    with pytest.raises(ConfigError, match="iwae is the β = 1 bound"):
        IWAE(RunConfig(beta=4.0))


def test_warmup_trains_with_the_logged_beta(tmp_path):
    """Each epoch logs the β in effect, and the loss uses it: epoch 1 of a warm-up (β = 0) is the reconstruction alone."""
    run = vaekit.train(epochs=3, objective="elbo:warmup=4", beta=2.0, out=str(tmp_path / "r"), **DIGITS)
    history = _metrics(run.run_dir)
    assert [m["beta"] for m in history] == [0.0, 0.5, 1.0]
    for m in history:
        assert m["train_loss"] == pytest.approx(m["train_recon"] + m["beta"] * m["train_kl"], rel=1e-5)


# --- free bits ------------------------------------------------------------------------------

def _record(model, params):
    """A StepOutput around posterior ``params`` whose reconstruction term is zero."""
    b = params.shape[0]
    z, kl = model.prior.rsample_kl(params)
    zeros = torch.zeros(b)
    return StepOutput(torch.zeros(b, 1), torch.zeros(b, 1), torch.zeros(b, 1), params, z, kl, None, zeros, None, z)


def test_free_bits_loss_and_gradient_match_the_hand_formula():
    """Kingma et al. 2016 (IAF paper, free bits): Σ_j max(λ, mean_B KL_j), KL_j per unit from torch.distributions; units below λ
    get no KL gradient, the others the gradient of their mean KL."""
    torch.manual_seed(0)
    d, lam = 6, 0.25
    model = composed_model(latent_dim=d)
    mu = torch.randn(16, d) * torch.tensor([0.05, 0.1, 1.0, 2.0, 0.02, 1.5])  # units 0, 1, 4 stay below λ
    logvar = torch.randn(16, d) * 0.1 - torch.tensor([0.0, 0.1, 1.0, 0.5, 0.05, 0.0])
    params = torch.cat([mu, logvar], 1).requires_grad_(True)
    objective = ELBO(RunConfig(beta=1.0), free_bits=lam)
    objective.bind(model)
    objective.set_epoch(1)
    loss, terms = objective.loss(model, _record(model, params))
    grad, = torch.autograd.grad(loss, params)

    ref_params = params.detach().clone().requires_grad_(True)
    m, lv = ref_params.chunk(2, 1)
    per_unit = kl_divergence(Normal(m, torch.exp(0.5 * lv)), Normal(0.0, 1.0)).mean(0)  # [d]
    below = per_unit.detach() < lam
    assert below.tolist() == [True, True, False, False, True, False]
    ref_loss = torch.where(below, torch.full_like(per_unit, lam), per_unit).sum()
    ref_grad, = torch.autograd.grad(ref_loss, ref_params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(per_unit.sum().item(), rel=1e-5)  # the logged KL is the plain one
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert torch.all(grad[:, :d][:, below] == 0) and torch.all(grad[:, d:][:, below] == 0)
    assert torch.all(grad[:, :d][:, ~below].abs().sum(0) > 0)


def test_kl_per_unit_sums_to_the_fused_kl_and_needs_a_factorised_posterior():
    torch.manual_seed(1)
    prior = GaussianPrior(3)
    params = torch.randn(5, 6)
    _, kl = prior.rsample_kl(params)
    torch.testing.assert_close(prior.kl_per_unit(params).sum(1), kl, rtol=1e-5, atol=1e-6)

    class FullCovariance(GaussianPrior):
        def posterior(self, params):
            mu, logvar = self.split(params)
            return torch.distributions.MultivariateNormal(mu, scale_tril=torch.diag_embed(torch.exp(0.5 * logvar)))

    with pytest.raises(ConfigError, match="free bits need a KL per latent unit"):
        ELBO(RunConfig(), free_bits=0.5).bind(composed_model(FullCovariance(3), latent_dim=3))


# --- iwae -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """An ELBO-trained VAE on the bundled digits and its binarized test set."""
    run = vaekit.train(epochs=5, out=str(tmp_path_factory.mktemp("obj") / "elbo"), **DIGITS)
    x = eval_inputs(vaekit.load_data("digits").test_x, "dynamic")
    return run.model.eval(), x


def _iwae_bound(model, x, k, seed):
    objective = IWAE(RunConfig(), k=k)
    torch.manual_seed(seed)
    with torch.no_grad():
        return objective.terms(model, objective.forward(model, x))[1]["iwae"].item()


def test_iwae_with_one_sample_is_the_elbo(digits_model):
    """k = 1: the same draws as the ELBO's forward pass, log p(x|z) − (log q(z|x) − log p(z)) with torch.distributions
    normals; averaged over noise it is the ELBO with the analytic KL."""
    model, x = digits_model
    torch.manual_seed(5)
    with torch.no_grad():
        rec = model(x)
    mu, logvar = rec.params.chunk(2, 1)
    mc_kl = (Normal(mu, torch.exp(0.5 * logvar)).log_prob(rec.z) - Normal(0.0, 1.0).log_prob(rec.z)).sum(1)
    assert _iwae_bound(model, x, 1, seed=5) == pytest.approx(float((rec.log_px - mc_kl).mean()), abs=1e-4)
    paired = [_iwae_bound(model, x, 1, seed=s) - float(elbo_terms(model, x, seed=s)["elbo"].mean()) for s in range(20)]
    # seen: mean paired difference (same seed: same draws) 0.0004 nats, its spread 0.06 over seeds
    assert abs(sum(paired) / len(paired)) < 0.05


def test_iwae_bound_rises_with_k_and_matches_the_importance_sampled_estimator(digits_model):
    """Burda et al. 2015, eq. 8 and Theorem 1: L_1 ≤ L_5 ≤ L_50; the objective's bound agrees with
    vaekit.evaluation.iwae_log_likelihood at the same K (the same log-weight formula, but its draws come from
    torch.distributions' rsample instead of the training forward pass with the fused op).  The exact
    reference is the next test."""
    model, x = digits_model
    ours = {k: sum(_iwae_bound(model, x, k, seed=s) for s in range(3)) / 3 for k in (1, 5, 50)}
    theirs = {}
    for k in ours:
        torch.manual_seed(0)
        theirs[k] = sum(float(iwae_log_likelihood(model, x, k, max_rows=50_000).mean()) for _ in range(3)) / 3
    # seen: ours {1: -28.63, 5: -28.34, 50: -28.27} (spread over seeds 0.03, 0.02, 0.003);
    # iwae_log_likelihood {1: -28.65, 5: -28.37, 50: -28.26}
    assert ours[1] + 0.15 < ours[5] < ours[50] - 0.02
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], abs=0.08)


def test_iwae_bound_against_the_exact_likelihood_of_a_linear_gaussian_model():
    """On a model whose log p(x) is a closed form (test_evaluation.LinearGaussian): with the exact posterior every
    importance weight is p(x), so the bound equals log p(x) for any k; with a wrong posterior it stays below
    log p(x) and closes the gap as k grows (Burda et al. 2015, Theorem 1)."""
    from test_evaluation import LinearGaussian

    lg = LinearGaussian()
    x = lg.sample_x(200)
    exact = float(lg.log_px(x).mean())
    for k in (1, 7):
        assert _iwae_bound(lg.model(), x, k, seed=0) == pytest.approx(exact, abs=1e-4)
    wrong = lg.model(shift=0.5, scale=1.6)
    bounds = [sum(_iwae_bound(wrong, x, k, seed=s) for s in range(5)) / 5 for k in (1, 10, 100)]
    # seen: gaps log p(x) − L_k of 0.89, 0.040, 0.005 nats for k = 1, 10, 100
    assert bounds[0] < bounds[1] < bounds[2] < exact
    assert exact - bounds[0] > 0.5 and exact - bounds[2] < 0.05


class KSampleELBO(IWAE):
    """Burda et al.'s "VAE with k samples" (table 1): the same k draws and decoder pass as ``iwae``, their log
    weights averaged instead of log-mean-exp'ed: the ELBO, estimated with k samples."""

    def terms(self, model, record):
        elbo = self.log_weights(model, record).mean()
        return -elbo, {"elbo": elbo}


class _KSample:
    @vaekit.hookimpl
    def vaekit_register_objectives(self, registry):
        registry.register("elbo_k", KSampleELBO)


@pytest.mark.parametrize("seed", [0, 1])
def test_iwae_training_gives_a_lower_nll_than_elbo_training(seed, tmp_path):
    """The issue's property (Burda et al. 2015, table 1): equal epochs and seed, the IWAE(k=5)-trained model's NLL
    (K = 1000 importance samples) is lower than the ELBO-trained one's on the bundled digits — also than the
    ELBO trained on the very same 5 draws per point (so the gain is the tighter bound, not the extra samples)."""
    pm = PluginManager(extra_plugins=[_KSample()], autoload=False)
    x = eval_inputs(vaekit.load_data("digits").test_x, "dynamic")
    nll = {}
    for objective in ("elbo", "elbo_k:k=5", "iwae:k=5"):
        run = vaekit.train(epochs=10, seed=seed, objective=objective, out=str(tmp_path / objective), pm=pm, **DIGITS)
        torch.manual_seed(123)
        nll[objective] = float(-iwae_log_likelihood(run.model, x, 1000, max_rows=20_000).mean())
    # seen (nats) elbo / elbo_k:k=5 / iwae:k=5: seed 0: 26.49 / 26.03 / 25.51; seed 1: 26.63 / 25.83 / 25.49;
    # seed 2: 26.38 / 26.21 / 25.66
    assert nll["elbo"] - nll["iwae:k=5"] > 0.3
    assert nll["elbo_k:k=5"] - nll["iwae:k=5"] > 0.15


def test_iwae_needs_a_posterior(tmp_path):
    with pytest.raises(ConfigError, match="iwae needs a posterior"):
        vaekit.train(epochs=1, prior="none", objective="iwae", out=str(tmp_path / "r"), **DIGITS)


def test_objective_from_toml_keeps_regularizer_penalties(tmp_path):
    """The TOML table form; iwae's k·B-row record still reaches the regularizers: their penalties are in the loss."""
    (tmp_path / "run.toml").write_text('regularizer = "mmd:weight=10"\n[objective]\nname = "iwae"\nk = 3\n')
    config = RunConfig.from_toml(tmp_path / "run.toml")
    assert config.objective.name == "iwae" and config.objective.options == {"k": 3}
    run = vaekit.train(config, epochs=1, out=str(tmp_path / "r"), **DIGITS)
    info = json.loads((run.run_dir / "config.json").read_text())
    assert info["config"]["objective"] == {"name": "iwae", "options": {"k": 3}}
    m = _metrics(run.run_dir)[0]
    assert m["train_mmd"] > 0 and "beta" not in m
    assert m["train_loss"] == pytest.approx(-m["train_iwae"] + 10 * m["train_mmd"], rel=1e-5)


def test_a_third_party_objective_trains(tmp_path):
    pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
    run = vaekit.train(epochs=1, objective="recon_only", out=str(tmp_path / "r"), pm=pm, **DIGITS)
    info = json.loads((run.run_dir / "config.json").read_text())
    assert info["config"]["objective"] == {"name": "recon_only", "options": {}}
    assert "plugin_for_tests" in info["plugin_sources"]["objective"]
    m = _metrics(run.run_dir)[0]
    assert m["train_loss"] == m["train_recon"] and "beta" not in m


# --- CLI ------------------------------------------------------------------------------------

CLI = ["--data", "digits", "--encoder", "mlp:hidden=32", "--latent-dim", "4", "--batch-size", "128", "--no-progress",
       "--no-figures", "--device", "cpu"]


@pytest.mark.parametrize("objective", ["iwae:k=5", "elbo:warmup=10,free_bits=0.25"])
def test_cli_objective_trains_and_resumes_exactly(objective, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert invoke("run", *CLI, "--objective", objective, "--epochs", "3", "--out", full).exit_code == 0
    res = invoke("run", *CLI, "--objective", objective, "--epochs", "2", "--out", part)
    assert res.exit_code == 0, res.output
    assert_one_line_error(invoke("run", "--resume", part, "--objective", "elbo"), "only --epochs may change (got --objective)")
    res = invoke("run", "--resume", part, "--epochs", "3", "--no-progress", "--no-figures")
    assert res.exit_code == 0, res.output
    w1, w2 = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert _metrics(part) == [dict(m, epoch_seconds=p["epoch_seconds"], samples_per_s=p["samples_per_s"])
                              for m, p in zip(_metrics(full), _metrics(part))]
    info = json.loads((part / "config.json").read_text())
    name = objective.partition(":")[0]
    assert info["config"]["objective"]["name"] == name and info["plugin_sources"]["objective"] == "builtin"
    if name == "elbo":
        assert info["config"]["objective"]["options"] == {"beta": None, "warmup": 10, "cycles": 0, "ratio": 0.5,
                                                          "free_bits": 0.25, "horizon": None}
        assert [m["beta"] for m in _metrics(part)] == pytest.approx([0.0, 0.1, 0.2])
        assert "beta 0.2" in res.stderr
    else:
        assert info["config"]["objective"]["options"] == {"k": 5}
        assert "iwae" in res.stderr


def test_cyclical_schedule_keeps_its_period_when_resumed_to_more_epochs(tmp_path):
    """config.json pins the cycles' horizon to the run's epochs at its start: resumed from 4 to 6 epochs, a
    cycles=2 run goes on with period 2 (β 0, 1, 0, 1, 0, 1), as a run started with horizon=4 does."""
    run = tmp_path / "r"
    assert invoke("run", *CLI, "--objective", "elbo:cycles=2", "--epochs", "4", "--out", run).exit_code == 0
    assert json.loads((run / "config.json").read_text())["config"]["objective"]["options"]["horizon"] == 4
    res = invoke("run", "--resume", run, "--epochs", "6", "--no-progress", "--no-figures")
    assert res.exit_code == 0, res.output
    assert [m["beta"] for m in _metrics(run)] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert ELBO(RunConfig(epochs=6), cycles=2, horizon=4).beta_at(5) == 0.0
    assert ELBO(RunConfig(epochs=6), cycles=2).beta_at(5) == pytest.approx(2 / 3)  # without it: period 3


def test_a_run_from_before_objectives_resumes_with_elbo(tmp_path):
    run = tmp_path / "r"
    assert invoke("run", *CLI, "--epochs", "1", "--out", run).exit_code == 0
    info = json.loads((run / "config.json").read_text())
    del info["config"]["objective"], info["plugin_sources"]["objective"]
    (run / "config.json").write_text(json.dumps(info))
    res = invoke("run", "--resume", run, "--epochs", "2", "--no-progress", "--no-figures")
    assert res.exit_code == 0, res.output
    assert [m["beta"] for m in _metrics(run)] == [1.0, 1.0]


def test_cli_objective_errors(tmp_path):
    assert_one_line_error(invoke("run", *CLI, "--objective", "iwea", "--out", tmp_path / "a"),
                          "unknown objective 'iwea'; known objectives: elbo, iwae; did you mean 'iwae'?")
    assert_one_line_error(invoke("run", *CLI, "--objective", "iwae:samples=5", "--out", tmp_path / "b"),
                          "objective 'iwae' has no option 'samples'; its options: k")
    assert_one_line_error(invoke("run", *CLI, "--objective", "elbo:warmup=ten", "--out", tmp_path / "c"),
                          "objective 'elbo' option 'warmup': 'ten' must be int")
    assert_one_line_error(invoke("run", *CLI, "--prior", "none", "--objective", "iwae", "--out", tmp_path / "d"),
                          "iwae needs a posterior")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_plugins_lists_objectives():
    res = invoke("plugins", "--json")
    assert res.exit_code == 0
    listing = json.loads(res.stdout)
    assert {p["name"] for p in listing["objective"]} >= {"elbo", "iwae"}
    assert listing["objective"][1]["options"]["k"]["default"] == 5


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch):
    """An allocation failure in a step (a CUDA OutOfMemoryError, or the CPU allocator's RuntimeError that a huge
    iwae:k gives) becomes a TrainingError saying what to lower, not an 'unexpected' error."""
    from vaekit.errors import TrainingError

    def oom(self, model, x, c=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(IWAE, "forward", oom)
    with pytest.raises(TrainingError, match=r"out of memory at step 1 .*a lower --batch-size \(or the samples k"):
        vaekit.train(objective="iwae:k=5", out=str(tmp_path / "r"), epochs=1, **DIGITS)
