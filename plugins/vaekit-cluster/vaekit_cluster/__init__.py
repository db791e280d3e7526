"""vaekit-cluster: deep clustering on an autoencoder's codes, as a separately installed vaekit plugin.

The hook implementations vaekit loads through the entry-point group ``vaekit``
(``pyproject.toml``: ``[project.entry-points.vaekit] cluster = "vaekit_cluster"``):

* ``vaekit_register_regularizers``: the clustering regularizers ``dec`` (DEC / IDEC) and ``dcn``;
* ``vaekit_register_commands``: ``vaekit cluster RUN`` (:mod:`vaekit_cluster.cli`);
* ``vaekit_epoch_end``: each epoch of a run with a clustering regularizer logs ``cluster_changed``
  (DEC's fraction of changed assignments) and, on labelled data, ``test_cluster_acc``,
  ``test_cluster_nmi`` and ``test_cluster_ari`` (:mod:`vaekit_cluster.metrics`) of the test split's codes.

A *clustering regularizer* is any regularizer with ``centroids`` (``[k, d]``) and
``assign(z [N, d]) -> [N]`` int64 hard clusters (:class:`Clusterer`), so other packages' clustering
regularizers get the metrics and the command too.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Protocol, runtime_checkable

import torch

import vaekit

__version__ = "0.1.0"

_REGULARIZERS = (("dec", "dec", "DEC"), ("dcn", "dcn", "DCN"))
"""(name, module, class) of each regularizer this package registers."""


@runtime_checkable
class Clusterer(Protocol):
    """What a clustering regularizer exposes: cluster centres and hard assignments of codes."""

    centroids: torch.Tensor
    """``[k, d]``: the k cluster centres in code space."""

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Hard clusters ``[N]`` int64 in ``0..k-1`` of codes ``z [N, d]`` (``model.embed(x)``)."""


def clusterer_of(model) -> Any | None:
    """The first of ``model.regularizers`` that is a :class:`Clusterer`, or None."""
    return next((reg for reg in model.regularizers if isinstance(reg, Clusterer)), None)


def regularizer_classes() -> dict[str, type]:
    """The regularizer classes of this package by name (``dec``, ``dcn``)."""
    return {name: getattr(importlib.import_module(f"{__name__}.{module}"), cls) for name, module, cls in _REGULARIZERS}


@vaekit.hookimpl
def vaekit_register_regularizers(registry) -> None:
    for name, cls in regularizer_classes().items():
        registry.register(name, cls)


@vaekit.hookimpl
def vaekit_register_commands(app) -> None:
    from . import cli

    cli.register(app)


@vaekit.hookimpl
def vaekit_epoch_end(trainer, epoch: int, metrics: dict) -> None:
    """Adds, for a run with a clustering regularizer, ``cluster_changed`` (DEC: the fraction of training
    assignments that changed at the last target refresh, which its ``tol`` stops on) and, when the test
    split has labels, ``test_cluster_acc/nmi/ari`` of the test split (codes ``model.embed(x)`` of the
    data as loaded, as ``vaekit cluster RUN --split test`` reads them)."""
    reg = clusterer_of(trainer.model)
    if reg is None:
        return
    changed = getattr(reg, "changed", None)
    if changed is not None and math.isfinite(changed):
        metrics["cluster_changed"] = changed
    labels = trainer.data.test_y
    if labels is None:
        return
    from .metrics import clustering_scores

    clusters = assign(trainer.model, reg, trainer.data.test_x, labels)
    metrics.update({f"test_cluster_{k}": v for k, v in clustering_scores(labels, clusters).items()})


def assign(model, reg, x: torch.Tensor, labels: torch.Tensor | None = None,
           batch_size: int = 500) -> torch.Tensor:
    """Hard clusters ``[N]`` int64 (CPU) of inputs ``x [N, *S]``: ``reg.assign`` of the codes
    ``model.embed(x)``, batched without gradients (a conditional model reads ``labels [N]``)."""
    return assign_codes(reg, codes(model, x, labels, batch_size))


def assign_codes(reg, z: torch.Tensor) -> torch.Tensor:
    """Hard clusters ``[N]`` int64 (CPU) of codes ``z [N, d]``: ``reg.assign`` on the centres' device, no gradients."""
    with torch.no_grad():
        return reg.assign(z.to(reg.centroids.device)).long().cpu()


def codes(model, x: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 500) -> torch.Tensor:
    """The codes ``model.embed(x)`` ``[N, d]`` float32 (CPU) of ``x [N, *S]``, as ``vaekit embed`` computes them."""
    from vaekit.apply import condition_labels
    from vaekit.evaluation import map_batches

    return map_batches(model, model.embed, x, batch_size, c=condition_labels(model, labels)).float()
