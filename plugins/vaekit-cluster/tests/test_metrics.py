"""ACC, NMI and ARI against hand-computed cases and a brute-force ACC, and their invariance to renaming."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

pytest.importorskip("vaekit_cluster", reason="install the plugin: pip install -e plugins/vaekit-cluster")

from vaekit.errors import ConfigError, DataError  # noqa: E402
from vaekit_cluster.metrics import best_map, check_k, cluster_accuracy, clustering_scores  # noqa: E402


def brute_force_acc(labels, clusters) -> float:
    """max over every one-to-one map m (clusters → labels, or its inverse when k > classes) of the
    fraction of points with m(c_i) = l_i: the definition of ACC (Xie et al. 2016, eq. 10), by enumeration."""
    ks, cs = sorted(set(clusters)), sorted(set(labels))
    best = 0
    if len(ks) <= len(cs):
        for image in itertools.permutations(cs, len(ks)):
            m = dict(zip(ks, image))
            best = max(best, sum(m[c] == l for c, l in zip(clusters, labels)))
    else:
        for image in itertools.permutations(ks, len(cs)):
            m = dict(zip(image, cs))
            best = max(best, sum(m.get(c) == l for c, l in zip(clusters, labels)))
    return best / len(labels)


@pytest.mark.parametrize("labels,clusters,acc", [
    # k = classes: clusters 1→0 (2 points), 0→1 (2), 2→2 (1); the point of label 2 in cluster 0 is wrong
    ([0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 2], 5 / 6),
    # k > classes: clusters 0→0 (2) and 2→1 (3); cluster 1 stays unmatched, its point counts as an error
    ([0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 2, 2], 5 / 6),
    # k < classes: one cluster for everything matches one label only
    ([0, 1, 2, 2], [0, 0, 0, 0], 2 / 4),
    # the one-to-one constraint: both clusters prefer label 0, only one gets it (a many-to-one map would give 1.0)
    ([0, 0, 0, 0, 1, 1], [0, 0, 1, 1, 1, 1], 4 / 6),
])
def test_acc_hand_computed(labels, clusters, acc):
    assert cluster_accuracy(labels, clusters) == pytest.approx(acc)
    assert brute_force_acc(labels, clusters) == pytest.approx(acc)


@pytest.mark.parametrize("seed", range(20))
def test_acc_equals_brute_force_over_all_one_to_one_maps(seed):
    rng = np.random.default_rng(seed)
    n, k, c = rng.integers(5, 30), rng.integers(1, 6), rng.integers(1, 6)
    labels, clusters = rng.integers(0, c, n), rng.integers(0, k, n)
    assert cluster_accuracy(labels, clusters) == pytest.approx(brute_force_acc(labels.tolist(), clusters.tolist()))


def test_best_map_is_the_matching_acc_scores():
    labels, clusters = [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 0, 2]
    assert best_map(labels, clusters) == {1: 0, 0: 1, 2: 2}


def test_nmi_and_ari_hand_computed():
    # independent partitions: MI = 0, and ARI = (0 - 2·2/6) / ((2+2)/2 - 2·2/6) = -0.5 (Hubert & Arabie 1985)
    s = clustering_scores([0, 0, 1, 1], [0, 1, 0, 1])
    assert s["nmi"] == pytest.approx(0.0, abs=1e-12) and s["ari"] == pytest.approx(-0.5) and s["acc"] == 0.5
    # clusters {0,1,2} {3} against labels {0,1} {2,3}: I(l; c) / ((H(l) + H(c)) / 2), natural logs
    s = clustering_scores([0, 0, 1, 1], [0, 0, 0, 1])
    mi = 0.5 * math.log(0.5 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125)
    h_l, h_c = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert s["nmi"] == pytest.approx(mi / ((h_l + h_c) / 2))
    # pairs: same cluster & same label 1 ({0,1}), expected (3·2/6) = 1, max (3 + 2)/2 = 2.5 → (1 - 1)/(2.5 - 1) = 0
    assert s["ari"] == pytest.approx(0.0, abs=1e-12) and s["acc"] == pytest.approx(0.75)


def test_metrics_are_invariant_to_renaming_clusters_and_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    clusters = np.where(rng.random(500) < 0.7, labels, rng.integers(0, 12, 500))  # 70% right, k = 12
    ref = clustering_scores(labels, clusters)
    assert 0.6 < ref["acc"] < 0.9
    for seed in range(3):
        r = np.random.default_rng(seed + 1)
        renamed = clustering_scores(r.permutation(10)[labels] + 100, r.permutation(12)[clusters] * 3)
        assert renamed == pytest.approx(ref)
    perfect = clustering_scores(labels, (labels + 3) % 10)
    assert perfect == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_bad_input_is_one_readable_error():
    with pytest.raises(DataError, match="3 labels but 2 cluster assignments"):
        clustering_scores([0, 1, 1], [0, 1])
    with pytest.raises(DataError, match="at least one sample"):
        cluster_accuracy([], [])
    with pytest.raises(ConfigError, match="must be an integer >= 2, got 1"):
        check_k(1, 100)
    with pytest.raises(ConfigError, match="must be an integer >= 2, got 2.5"):
        check_k(2.5)
    with pytest.raises(DataError, match="k = 11 but there are only 10 samples"):
        check_k(11, 10)
