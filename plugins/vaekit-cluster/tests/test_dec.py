"""DEC / IDEC (Xie et al. 2016; Guo et al. 2017): formulas against numpy, the KL gradient, early stop,
exact resume, bad k, and the clustering property on the digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import vaekit
from vaekit import ConfigError, DataError, StepOutput
from vaekit.manager import PluginManager
from vaekit.training import load_data

vaekit_cluster = pytest.importorskip("vaekit_cluster", reason="install the plugin: pip install -e plugins/vaekit-cluster")
from vaekit_cluster.dec import DEC, soft_assignment, target_distribution  # noqa: E402
from vaekit_cluster.metrics import cluster_accuracy, kmeans  # noqa: E402


def plugin_manager() -> PluginManager:
    """The built-ins and this package's hooks, as its entry point loads them (nothing else autoloaded)."""
    return PluginManager(extra_plugins=[vaekit_cluster], autoload=False)


BASE = dict(data="digits", encoder="mlp:hidden=128", prior="none", likelihood="gaussian", latent_dim=10,
            quiet=True, figures=False)


def pretrain(tmp_path_factory):
    """A deterministic MLP autoencoder pretrained on the digits (30 epochs, ~4 s), as ``--init`` source."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cluster") / "ae"
    vaekit.train(**BASE, epochs=30, seed=0, out=str(out), pm=plugin_manager())
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory)


def kmeans_accuracy(model, data, seed=0) -> float:
    """ACC of k-means (n_init = 20) on the training samples' codes: the baseline DEC and DCN start from."""
    with torch.no_grad():
        return cluster_accuracy(data.train_y.numpy(), kmeans(model.embed(data.train_x), 10, seed).numpy())


def own_accuracy(model, data) -> float:
    """ACC of a clustering regularizer's own assignment of the training samples' codes."""
    with torch.no_grad():
        return cluster_accuracy(data.train_y.numpy(), model.regularizers[0].assign(model.embed(data.train_x)).numpy())


def test_q_and_p_match_the_papers_formulas():
    rng = np.random.default_rng(0)
    z, mu = rng.normal(size=(50, 4)), rng.normal(size=(6, 4))
    for alpha in (1.0, 2.5):
        # Xie et al. 2016, eq. 1 and eq. 3, written out
        kern = (1 + ((z[:, None, :] - mu[None]) ** 2).sum(-1) / alpha) ** (-(alpha + 1) / 2)
        q_ref = kern / kern.sum(1, keepdims=True)
        f = q_ref.sum(0)
        w = q_ref ** 2 / f
        p_ref = w / w.sum(1, keepdims=True)
        q = soft_assignment(torch.tensor(z), torch.tensor(mu), alpha)
        np.testing.assert_allclose(q.numpy(), q_ref, rtol=1e-10)
        np.testing.assert_allclose(target_distribution(q).numpy(), p_ref, rtol=1e-10)


def record_of(z: torch.Tensor, index: torch.Tensor) -> StepOutput:
    """A training step's record carrying only what the clustering penalties read (codes, batch positions)."""
    none = torch.empty(0)
    return StepOutput(x=none, x_input=none, h=none, params=none, z=z, kl=none, likelihood_params=none,
                      log_px=none, index=index)


def test_penalty_is_kl_of_the_target_from_q_against_torch_distributions():
    """``DEC.penalty`` = mean over the batch of KL(P_i ‖ Q_i) (P the stored target rows, Q the Student's t of
    the batch's codes), checked against torch.distributions' categorical KL; the reversed KL(Q‖P) differs."""
    from torch.distributions import Categorical, kl_divergence

    g = torch.Generator().manual_seed(0)
    dec = DEC(4, (64,), k=5, alpha=1.0)
    with torch.no_grad():
        dec.centroids.copy_(torch.randn(5, 4, generator=g, dtype=torch.float64).float())
    dec.target = torch.softmax(3 * torch.randn(30, 5, generator=g), dim=1)  # P [N, k] of 30 training samples
    index = torch.tensor([3, 17, 0, 29, 8, 8])
    z = torch.randn(6, 4, generator=g)
    q = soft_assignment(z, dec.centroids.detach())
    reference = kl_divergence(Categorical(probs=dec.target[index]), Categorical(probs=q)).mean()
    reversed_kl = kl_divergence(Categorical(probs=q), Categorical(probs=dec.target[index])).mean()
    got = dec.penalty(record_of(z, index))
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
    assert abs(float(reversed_kl - reference)) > 0.05  # the direction is checked, not only the value's order
    assert dec.penalty(record_of(z, None)) is None  # evaluation passes carry no index: no penalty


def test_refresh_builds_the_target_from_all_training_codes(pretrained):
    """``refresh``: Q of every training sample's code, then P with the cluster frequencies f_j = Σ_i q_ij over
    all N samples (not per batch), recomputed in numpy from the codes of ``model.embed``."""
    from types import SimpleNamespace

    data = load_data("digits")
    model = vaekit.load_run(pretrained, pm=plugin_manager())
    dec = DEC(10, (64,), k=10)
    z = model.embed(data.train_x).detach().double().numpy()
    rng = np.random.default_rng(1)
    mu = z[rng.choice(len(z), 10, replace=False)]
    with torch.no_grad():
        dec.centroids.copy_(torch.as_tensor(mu))
    changed = dec.refresh(SimpleNamespace(model=model, train_x=data.train_x, train_y=None))
    kernel = 1.0 / (1.0 + ((z[:, None, :] - mu[None]) ** 2).sum(-1))
    q = kernel / kernel.sum(1, keepdims=True)
    w = q ** 2 / q.sum(0)
    p = w / w.sum(1, keepdims=True)
    np.testing.assert_allclose(dec.target.numpy(), p, rtol=2e-4, atol=1e-6)
    np.testing.assert_array_equal(dec.assigned.numpy(), q.argmax(1))
    assert np.isnan(changed)  # the first refresh has nothing to compare with


def test_kl_gradient_pushes_codes_toward_their_centroids():
    """Gradient descent on KL(P‖Q) (P fixed) moves the codes towards their nearest centre (the
    self-training effect: P is sharper than Q)."""
    torch.manual_seed(0)
    mu = torch.randn(5, 3) * 4
    z = (mu[torch.randint(0, 5, (200,))] + torch.randn(200, 3) * 1.5).requires_grad_()
    p = target_distribution(soft_assignment(z, mu)).detach()
    near = torch.cdist(z, mu).argmin(1)
    before = (z - mu[near]).norm(dim=1).detach()
    kl = (p * (p.log() - soft_assignment(z, mu).log())).sum(1).mean()
    kl.backward()
    after = (z - 0.5 * z.grad - mu[near]).norm(dim=1).detach()
    closer = (after < before).float().mean().item()
    # seen (seeds 0/1/2): 1.00 of the codes closer each time; mean distance 2.3804 -> 2.3800, 2.1794 -> 2.1791
    assert closer > 0.95 and after.mean() < before.mean()


def test_bad_k_is_one_line(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="k must be an integer >= 2"):
        DEC(10, (64,), k=1)
    with pytest.raises(DataError, match="dec: k = 5000 but there are only .* samples"):
        vaekit.train(**BASE, epochs=1, init=str(pretrained), regularizers=["dec:k=5000"], out=str(tmp_path / "r"),
                     pm=plugin_manager())


def test_early_stop_is_logged_and_resume_trains_nothing(pretrained, tmp_path, capsys):
    out = tmp_path / "dec"
    kw = dict(**BASE, init=str(pretrained), seed=0, pm=plugin_manager(), out=str(out))
    result = vaekit.train(**{**kw, "quiet": False}, epochs=20, regularizers=["dec:k=10,update_interval=5,tol=0.5"])
    err = capsys.readouterr().err
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(history) < 20 and "stopped" in history[-1] and "below tol=0.5" in history[-1]["stopped"]
    assert "stopped early at epoch" in err
    step = history[-1]["step"]
    assert step % 5 == 0  # stopped right after a refresh, mid-epoch
    again = vaekit.resume(out, quiet=False, figures=False, pm=plugin_manager())
    assert "nothing to resume" in capsys.readouterr().err
    assert again.history == result.history  # no epoch trained again


def test_resume_is_bit_identical(pretrained, tmp_path):
    """2 + 2 epochs equal 4 epochs: the centres (model state), the target P and the assignments
    (training state) and the refresh schedule all continue exactly."""
    spec = ["dec:k=10,update_interval=7,tol=0"]  # 12 steps per epoch: refreshes fall mid-epoch
    kw = dict(**BASE, init=str(pretrained), seed=3, regularizers=spec)
    full = vaekit.train(**kw, epochs=4, out=str(tmp_path / "full"), pm=plugin_manager())
    vaekit.train(**kw, epochs=2, out=str(tmp_path / "half"), pm=plugin_manager())
    resumed = vaekit.resume(tmp_path / "half", epochs=4, quiet=True, figures=False, pm=plugin_manager())
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = full.model.regularizers[0], resumed.model.regularizers[0]
    assert torch.equal(ra.target, rb.target) and torch.equal(ra.assigned, rb.assigned)
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]


def test_dec_raises_accuracy_over_kmeans_on_the_same_codes(pretrained, tmp_path):
    """DEC clusters the data it trains on (transductive, as in the paper): ACC on the training digits."""
    data = load_data("digits")
    base = kmeans_accuracy(vaekit.load_run(pretrained, pm=plugin_manager()), data)
    result = vaekit.train(**BASE, init=str(pretrained), seed=0, epochs=60, out=str(tmp_path / "dec"),
                          regularizers=["dec:k=10,recon=false,weight=1,update_interval=20"], pm=plugin_manager())
    acc = own_accuracy(result.model, data)
    # seen (training digits, AE and DEC seeds 0/1/2): k-means 0.692/0.692/0.753 -> DEC 0.701/0.707/0.802
    # (test digits: 0.646 -> 0.666, 0.669 -> 0.660, 0.733 -> 0.755; IDEC weight=100: +0.004/+0.015 on training)
    assert acc > base + 0.005, (acc, base)
