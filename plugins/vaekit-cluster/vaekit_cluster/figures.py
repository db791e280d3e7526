"""Figures of a clustering: example inputs per cluster (``clusters.png``) and the cluster × label
counts (``confusion.png``), matplotlib, written atomically with vaekit's figure helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .metrics import best_map, contingency


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def cluster_order(clusters: torch.Tensor, labels: torch.Tensor | None) -> list[int]:
    """The cluster ids ``0..k-1`` present in ``clusters [N]``, ordered by the label each is matched to
    (:func:`~vaekit_cluster.metrics.best_map`; unmatched clusters last), or by id without labels."""
    present = sorted(set(clusters.tolist()))
    if labels is None:
        return present
    matched = best_map(labels, clusters)
    return sorted(present, key=lambda c: (c not in matched, matched.get(c, 0), c))


def plot_clusters(x: torch.Tensor, clusters: torch.Tensor, path: Path, labels: torch.Tensor | None = None,
                  per_row: int = 10, title: str | None = None, seed: int = 0) -> bool:
    """One row per cluster of ``per_row`` of its inputs (a random draw seeded with ``seed``) from ``x [N, *S]`` and
    ``clusters [N]``; rows ordered as :func:`cluster_order` and labelled with the cluster id, its size and
    its matched label.  False (nothing written) if the inputs are not image-like."""
    from vaekit.viz import as_images, image_grid, save_figure

    images = as_images(x)
    if images is None:
        return False
    order = cluster_order(clusters, labels)
    matched = best_map(labels, clusters) if labels is not None else {}
    blank = np.ones_like(images[:1])
    tiles, names = [], []
    generator = torch.Generator().manual_seed(seed)
    for c in order:
        idx = torch.nonzero(clusters == c).flatten()
        row = images[idx[torch.randperm(len(idx), generator=generator)[:per_row]].numpy()]
        tiles.append(np.concatenate([row] + [blank] * (per_row - len(row))))
        names.append(f"cluster {c} (n={len(idx)})" + (f" → {matched[c]}" if c in matched else ""))
    grid = image_grid(np.concatenate(tiles), nrow=per_row)
    plt = _plt()
    h = images.shape[1] + 1
    fig, ax = plt.subplots(figsize=(per_row * 0.6 + 2.5, len(order) * 0.6 + 0.6))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([1 + h * i + (h - 1) / 2 for i in range(len(order))], names, fontsize=8)
    ax.set_xticks([])
    ax.set_title(title or "examples per cluster", fontsize=9)
    save_figure(fig, path)
    return True


def plot_confusion(labels: torch.Tensor, clusters: torch.Tensor, path: Path, title: str | None = None) -> None:
    """The cluster × label counts of ``labels [N]`` and ``clusters [N]`` as an annotated heat map, clusters
    ordered as :func:`cluster_order` (so the matched pairs lie on the diagonal)."""
    from vaekit.viz import save_figure

    counts, cluster_ids, label_ids = contingency(labels, clusters)
    order = cluster_order(clusters, labels)
    counts = counts[[int(np.searchsorted(cluster_ids, c)) for c in order]]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(0.5 * len(label_ids) + 2, 0.45 * len(order) + 1.5))
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(label_ids)), [str(v) for v in label_ids])
    ax.set_yticks(range(len(order)), [str(c) for c in order])
    ax.set_xlabel("label")
    ax.set_ylabel("cluster")
    ax.set_title(title or "cluster × label counts", fontsize=9)
    save_figure(fig, path)
