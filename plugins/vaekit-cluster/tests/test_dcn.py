"""DCN (Yang et al. 2017): the online centroid update against numpy, exact resume, and the clustering
property on the digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dec import BASE, kmeans_accuracy, own_accuracy, plugin_manager, pretrain, record_of

import vaekit
from vaekit import ConfigError
from vaekit.training import load_data
from vaekit_cluster.dcn import DCN, online_kmeans_update
from vaekit_cluster.metrics import fit_kmeans


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory)


def test_online_update_is_the_running_mean_of_the_assigned_codes():
    rng = np.random.default_rng(0)
    k, d = 4, 3
    m0, n0 = rng.normal(size=(k, d)), rng.integers(1, 5, size=k).astype(float)
    centroids, counts = torch.tensor(m0), torch.tensor(n0)
    m, c = m0.copy(), n0.copy()
    seen = [[] for _ in range(k)]
    for _ in range(6):
        z, s = rng.normal(size=(10, d)), rng.integers(0, k - 1, size=10)  # cluster k-1 never hit
        online_kmeans_update(centroids, counts, torch.tensor(z), torch.tensor(s))
        for zi, si in zip(z, s):  # Yang et al. 2017, eq. 14, one sample at a time
            c[si] += 1
            m[si] -= (m[si] - zi) / c[si]
            seen[si].append(zi)
    np.testing.assert_allclose(centroids.numpy(), m, rtol=1e-12)
    np.testing.assert_array_equal(counts.numpy(), c)
    # and both are the mean of the n0 codes behind the initial centre and every code assigned since
    mean = np.array([(n0[j] * m0[j] + np.sum(seen[j], axis=0)) / (n0[j] + len(seen[j])) if seen[j] else m0[j]
                     for j in range(k)])
    np.testing.assert_allclose(centroids.numpy(), mean, rtol=1e-12)


def test_penalty_is_half_the_squared_distance_to_the_assigned_centroid():
    """``DCN.penalty`` = ½ mean_B ‖z_i − m_{s_i}‖² with s_i the stored assignment of training sample index_i (numpy)."""
    g = torch.Generator().manual_seed(0)
    dcn = DCN(3, (64,), k=4)
    dcn.centroids.copy_(torch.randn(4, 3, generator=g))
    dcn.assignments = torch.randint(0, 4, (20,), generator=g)
    index = torch.tensor([5, 0, 19, 5])
    z = torch.randn(4, 3, generator=g)
    m, s = dcn.centroids.numpy(), dcn.assignments.numpy()[index.numpy()]
    reference = 0.5 * np.mean(np.sum((z.numpy() - m[s]) ** 2, axis=1))
    assert float(dcn.penalty(record_of(z, index))) == pytest.approx(reference, rel=1e-6)
    assert dcn.penalty(record_of(z, None)) is None


def test_one_step_updates_assignments_then_centroids_as_the_paper(pretrained, tmp_path):
    """One network step (the whole training set as one batch), then Algorithm 1's updates: s_i = the nearest
    k-means centre of each code under the UPDATED network, m_j ← the running mean over the k-means counts
    and the new members — recomputed in numpy from the initial and the final model's codes."""
    data = load_data("digits")
    n = len(data.train_x)
    with torch.no_grad():
        z0 = vaekit.load_run(pretrained, pm=plugin_manager()).embed(data.train_x)
    m0, labels0 = fit_kmeans(z0, 10, seed=4)
    result = vaekit.train(**BASE, init=str(pretrained), seed=4, epochs=1, batch_size=n, regularizers=["dcn:k=10,weight=10"],
                          out=str(tmp_path / "dcn"), pm=plugin_manager())
    with torch.no_grad():
        z1 = result.model.embed(data.train_x).double().numpy()
    m0, c0 = m0.double().numpy(), np.bincount(labels0.numpy(), minlength=10)
    s = ((z1[:, None] - m0[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(s, minlength=10)
    sums = np.stack([z1[s == j].sum(0) for j in range(10)])
    m1 = (c0[:, None] * m0 + sums) / (c0 + counts)[:, None]
    reg = result.model.regularizers[0]
    np.testing.assert_array_equal(reg.assignments.numpy(), s)
    np.testing.assert_array_equal(reg.counts.numpy(), c0 + counts)
    np.testing.assert_allclose(reg.centroids.double().numpy(), m1, rtol=1e-4, atol=1e-5)
    assert np.abs(m1 - m0).max() > 1e-3  # the step moved the centres: the update is exercised


def test_bad_k_is_one_line():
    with pytest.raises(ConfigError, match="k must be an integer >= 2"):
        DCN(10, (64,), k=0)


def test_resume_is_bit_identical(pretrained, tmp_path):
    kw = dict(**BASE, init=str(pretrained), seed=1, regularizers=["dcn:k=10,weight=10"])
    full = vaekit.train(**kw, epochs=4, out=str(tmp_path / "full"), pm=plugin_manager())
    vaekit.train(**kw, epochs=2, out=str(tmp_path / "half"), pm=plugin_manager())
    resumed = vaekit.resume(tmp_path / "half", epochs=4, quiet=True, figures=False, pm=plugin_manager())
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.model.regularizers[0].assignments, resumed.model.regularizers[0].assignments)
    # the counts grew by one per sample seen: the k-means cluster sizes (N) plus 4 epochs of N
    assert full.model.regularizers[0].counts.sum().item() == 5 * len(load_data("digits").train_x)


def test_dcn_raises_accuracy_over_kmeans_on_the_same_codes(pretrained, tmp_path):
    data = load_data("digits")
    base = kmeans_accuracy(vaekit.load_run(pretrained, pm=plugin_manager()), data)
    result = vaekit.train(**BASE, init=str(pretrained), seed=0, epochs=60, regularizers=["dcn:k=10,weight=10"],
                          out=str(tmp_path / "dcn"), pm=plugin_manager())
    acc = own_accuracy(result.model, data)
    # seen (training digits, AE and DCN seeds 0/1/2): k-means 0.692/0.692/0.753 -> DCN 0.704/0.710/0.768
    # (test digits: 0.646 -> 0.669, 0.669 -> 0.669, 0.733 -> 0.719)
    assert acc > base + 0.005, (acc, base)
