"""Clustering metrics against ground-truth labels (ACC, NMI, ARI) and the k-means baseline.

* **ACC**, unsupervised clustering accuracy (Xie et al. 2016, "Unsupervised deep embedding for
  clustering analysis", ICML, eq. 10): ``max_m (1/N) Σ_i 1[l_i = m(c_i)]`` over one-to-one maps
  ``m`` from clusters to labels, found by the Hungarian algorithm
  (:func:`scipy.optimize.linear_sum_assignment` on the cluster × label contingency table).  With
  k ≠ the number of classes, ``min(k, classes)`` pairs are matched and the points of unmatched
  clusters count as errors.
* **NMI**, normalised mutual information ``I(l; c) / ((H(l) + H(c)) / 2)`` (the arithmetic mean,
  as in Xie et al. 2016): :func:`sklearn.metrics.normalized_mutual_info_score`.
* **ARI**, adjusted Rand index (Hubert & Arabie 1985): :func:`sklearn.metrics.adjusted_rand_score`;
  0 for chance, 1 for identical partitions, negative for worse than chance.

All three are invariant to renaming the clusters or the labels.
"""

from __future__ import annotations

import numpy as np
import torch

from vaekit.errors import ConfigError, DataError

KMEANS_INIT = 20
"""k-means restarts (``n_init``) of :func:`fit_kmeans`: the best of 20 by inertia (Xie et al. 2016 use 20 to
initialise DEC's centres)."""


def _ints(a, what: str) -> np.ndarray:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if a.ndim != 1:
        raise DataError(f"{what} must be one integer per sample, [N]; got shape {list(a.shape)}")
    return a.astype(np.int64)


def _pair(labels, clusters) -> tuple[np.ndarray, np.ndarray]:
    labels, clusters = _ints(labels, "labels"), _ints(clusters, "cluster assignments")
    if len(labels) != len(clusters):
        raise DataError(f"{len(labels)} labels but {len(clusters)} cluster assignments")
    if len(labels) == 0:
        raise DataError("clustering metrics need at least one sample")
    return labels, clusters


def contingency(labels, clusters) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts ``[k, C]`` of points in each (cluster, label) pair, with the cluster ids ``[k]`` and label
    ids ``[C]`` of its rows and columns (sorted, those present).  ``labels``, ``clusters``: ``[N]`` ints.
    Raises DataError for inputs of different lengths or no samples."""
    from sklearn.metrics.cluster import contingency_matrix

    labels, clusters = _pair(labels, clusters)
    return contingency_matrix(clusters, labels), np.unique(clusters), np.unique(labels)


def _matching(labels, clusters):
    from scipy.optimize import linear_sum_assignment

    counts, cluster_ids, label_ids = contingency(labels, clusters)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return counts, rows, cols, cluster_ids, label_ids


def best_map(labels, clusters) -> dict[int, int]:
    """The one-to-one map cluster id → label id that :func:`cluster_accuracy` scores (Hungarian
    algorithm on the contingency table); clusters left unmatched (k > classes) are absent.
    Raises DataError as :func:`contingency`."""
    _, rows, cols, cluster_ids, label_ids = _matching(labels, clusters)
    return {int(cluster_ids[r]): int(label_ids[c]) for r, c in zip(rows, cols)}


def cluster_accuracy(labels, clusters) -> float:
    """Unsupervised clustering accuracy ACC in [0, 1] of cluster assignments ``[N]`` against labels ``[N]``
    (Xie et al. 2016, eq. 10): the fraction of points whose cluster's best one-to-one label is their label.
    Raises DataError as :func:`contingency`."""
    counts, rows, cols, _, _ = _matching(labels, clusters)
    return float(counts[rows, cols].sum() / counts.sum())


def clustering_scores(labels, clusters) -> dict[str, float]:
    """``{"acc", "nmi", "ari"}`` of cluster assignments ``[N]`` against labels ``[N]`` (see the module
    docstring for definitions and sources).  Raises DataError as :func:`contingency`."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, clusters = _pair(labels, clusters)
    return {"acc": cluster_accuracy(labels, clusters),
            "nmi": float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic")),
            "ari": float(adjusted_rand_score(labels, clusters))}


def check_k(k, n: int | None = None, what: str = "the number of clusters k") -> int:
    """``k`` as an int.  Raises ConfigError unless it is an integer >= 2, DataError if it exceeds the
    ``n`` samples (when given); ``what`` names the setting in the message (e.g. ``"dec: k"``)."""
    if isinstance(k, bool) or int(k) != k or k < 2:
        raise ConfigError(f"{what} must be an integer >= 2, got {k}")
    if n is not None and k > n:
        raise DataError(f"{what} = {int(k)} but there are only {n} samples: give k <= {n} or more data")
    return int(k)


def fit_kmeans(codes: torch.Tensor, k: int, seed: int = 0, what: str = "the number of clusters k"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's :class:`~sklearn.cluster.KMeans` (k-means++ starts, the best of :data:`KMEANS_INIT`
    restarts by inertia, seeded with ``seed``) on ``codes [N, d]`` -> (centres ``[k, d]``, assignments
    ``[N]`` int64), both on the codes' device, the centres in their dtype.  Raises ConfigError / DataError
    as :func:`check_k`."""
    from sklearn.cluster import KMeans

    check_k(k, len(codes), what)
    km = KMeans(n_clusters=int(k), n_init=KMEANS_INIT, random_state=seed).fit(codes.detach().cpu().double().numpy())
    centres = torch.as_tensor(km.cluster_centers_, dtype=codes.dtype, device=codes.device)
    return centres, torch.as_tensor(km.labels_.astype(np.int64), device=codes.device)


def kmeans(codes: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """The k-means baseline's assignments ``[N]`` int64 of ``codes [N, d]`` (:func:`fit_kmeans`)."""
    return fit_kmeans(codes, k, seed)[1]
