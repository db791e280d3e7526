"""``vaekit embed``, ``reconstruct`` and ``score`` (vaekit.apply) on real digits: one-class anomaly detection,
codes that are features, and every output checked against data loaded independently."""

import csv
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import vaekit
from vaekit.cli import build_app
from vaekit.data import load_mnist5k

runner = CliRunner()
APP = build_app()
SCORED = "mnist:test_per_class=30"  # 300 test digits, 30 of them zeros


def invoke(*args):
    result = runner.invoke(APP, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def one_class_run(out, prior):
    """The issue's one-class recipe: train on the zeros only (200 of them, 4 epochs, seconds)."""
    invoke("run", "--data", "mnist:classes=0,train_per_class=200", "--encoder", "mlp:hidden=64", "--prior", prior,
           "--latent-dim", "8", "--epochs", "4", "--batch-size", "32", "--out", out, "--no-progress", "--no-figures")
    return out


@pytest.fixture(scope="module")
def zeros_vae(tmp_path_factory):
    return one_class_run(tmp_path_factory.mktemp("apply") / "zeros-vae", "gaussian")


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_one_class_vae_scores_the_other_digits_as_anomalies(zeros_vae, tmp_path):
    """`vaekit run --data mnist:classes=0` then `vaekit score RUN --data mnist --normal-class 0`: every score
    tells the other nine digits from unseen zeros with ROC AUC >= 0.9 (the issue's bar), the CSV holds the
    test digits' labels in order, and the printed AUCs are sklearn's on the CSV's columns."""
    res = invoke("score", zeros_vae, "--data", SCORED, "--normal-class", "0", "-k", "20", "--json",
                 "--out", tmp_path / "scores.csv")
    report = json.loads(res.stdout)
    assert report["n"] == 300 and set(report["auc"]) == {"recon_error", "neg_elbo", "nll"}
    # seen (4 epochs, seeds 0 and 1): recon_error 0.987/0.977, neg_elbo 0.967/0.964, nll 0.981/0.972
    assert min(report["auc"].values()) >= 0.9, report["auc"]
    table = read_csv(tmp_path / "scores.csv")
    assert list(table) == ["index", "label", "recon_error", "neg_elbo", "nll"]
    labels = load_mnist5k(400, 30).test_y.numpy()
    assert np.array_equal(table["index"], np.arange(300)) and np.array_equal(table["label"], labels)
    for name, auc in report["auc"].items():
        assert auc == pytest.approx(roc_auc_score(labels != 0, table[name]), abs=1e-9), name
    # importance sampling tightens the bound (Burda et al. 2015): NLL below -ELBO on average; seen 274.7 < 289.2 nats
    assert table["nll"].mean() < table["neg_elbo"].mean()
    shown = runner.invoke(APP, ["score", str(zeros_vae), "--data", SCORED, "--normal-class", "0", "-k", "0",
                                "--out", str(tmp_path / "s2.csv")])
    assert shown.exit_code == 0 and "ROC AUC (normal class 0)" in shown.stdout
    assert list(read_csv(tmp_path / "s2.csv")) == ["index", "label", "recon_error", "neg_elbo"]  # -k 0: no NLL


def test_one_class_autoencoder_scores_by_reconstruction_error(tmp_path):
    """A deterministic autoencoder has no density: its one score is the reconstruction error, which still
    separates the zeros it was trained on from the other digits."""
    run = one_class_run(tmp_path / "zeros-ae", "none")
    scores, labels = vaekit.score(run, data=SCORED)
    assert set(scores) == {"recon_error"}
    auc = roc_auc_score((labels != 0).numpy(), scores["recon_error"].numpy())
    assert auc >= 0.9, auc  # seen 0.988, 0.989 (seeds 0, 1)


def test_reconstruct_writes_what_score_measures(zeros_vae, tmp_path, monkeypatch):
    """recon.npy holds E[x|z = posterior mean] for each test digit in order: its squared error summed over the
    784 pixels, against the digits loaded here, is score's recon_error column; the PNG shows data rows
    over their reconstructions."""
    from vaekit import viz

    grids = []
    monkeypatch.setattr(viz, "save_grid", lambda x, path, **kw: grids.append(x) or True)
    invoke("reconstruct", zeros_vae, "--data", SCORED, "--out", tmp_path / "recon.npy", "--png", tmp_path / "g.png",
           "--batch-size", "7")
    invoke("score", zeros_vae, "--data", SCORED, "-k", "0", "--json", "--out", tmp_path / "scores.csv")
    recon = np.load(tmp_path / "recon.npy")
    data = load_mnist5k(400, 30)
    x = data.test_x.numpy()
    assert recon.dtype == np.float32 and recon.shape == x.shape
    assert np.array_equal(np.load(tmp_path / "recon.labels.npy"), data.test_y.numpy())
    sse = ((recon - x) ** 2).reshape(len(x), -1).sum(1)
    assert np.allclose(read_csv(tmp_path / "scores.csv")["recon_error"], sse, rtol=1e-5, atol=1e-4)
    grid = grids[0]
    assert grid.shape == (64, 1, 28, 28)
    assert torch.equal(grid[:8], data.test_x[:8]) and torch.allclose(grid[8:16], torch.from_numpy(recon[:8]))
    assert torch.equal(grid[16:24], data.test_x[8:16])


def test_embed_writes_the_posterior_means_with_their_labels(trained_run, tmp_path):
    """The codes of a VAE are its posterior means μ(x) (the head's first d outputs, computed here from the
    encoder and head on digits loaded here), split by split, in order, with their labels, whatever the
    batch size; .npz holds codes and labels in one file."""
    invoke("embed", trained_run, "--split", "train", "--out", tmp_path / "train.npz")
    invoke("embed", trained_run, "--out", tmp_path / "test.npy", "--batch-size", "7")
    invoke("embed", trained_run, "--split", "all", "--out", tmp_path / "all.npy")
    data = load_mnist5k(30, 10)  # the run's own data (conftest.SMALL_MNIST), loaded here
    model = vaekit.load_run(trained_run)
    with torch.no_grad():
        mu = model.head(model.encoder(data.test_x))[:, :2].numpy()
    test = np.load(tmp_path / "test.npy")
    assert test.dtype == np.float32 and np.allclose(test, mu, atol=1e-5)
    assert np.array_equal(np.load(tmp_path / "test.labels.npy"), data.test_y.numpy())
    with np.load(tmp_path / "train.npz") as z:
        train, train_labels = z["codes"], z["labels"]
    assert train.shape == (300, 2) and np.array_equal(train_labels, data.train_y.numpy())
    assert np.allclose(np.load(tmp_path / "all.npy"), np.concatenate([train, test]), atol=1e-5)  # other batches
    with torch.no_grad():
        assert np.allclose(train, model.head(model.encoder(data.train_x))[:, :2].numpy(), atol=1e-5)
    codes, labels = vaekit.embed(trained_run)  # the Python API behind the command
    assert np.allclose(codes.numpy(), test, atol=1e-5) and torch.equal(labels, data.test_y)
