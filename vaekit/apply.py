"""A trained run applied to data: codes, reconstructions and per-sample anomaly scores.

The Python API behind ``vaekit embed``, ``vaekit reconstruct`` and ``vaekit score`` (and the
loading ``vaekit eval`` shares).  A run is a run directory, a :class:`~vaekit.training.TrainResult`
or a model from :func:`vaekit.load_run`; the data are the run's own dataset as its
``config.json`` records it, or any other (``"mnist"``, ``"digits:classes=0,3"``, a path) whose
samples have the shape the run was trained on.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .errors import CheckpointError, ConfigError, DataError
from .evaluation import EVAL_SEED, _device, elbo_terms, iwae_log_likelihood, map_batches, reconstruction_error
from .model import VAEModel
from .rng import seeded_noise

SPLITS = ("train", "test", "all")
"""The splits these functions read: ``all`` is the train split followed by the test split."""

SCORE_UNITS = {
    "recon_error": "data units² (summed over the data dims)",
    "neg_elbo": "nats",
    "nll": "nats",
}
"""Each anomaly score's unit; higher scores are more anomalous."""


class Codes(NamedTuple):
    """What :func:`embed` returns: ``codes [N, d]`` float32 and ``labels [N]`` int64 (None without labels)."""

    codes: torch.Tensor
    labels: torch.Tensor | None


class Reconstructions(NamedTuple):
    """What :func:`reconstruct` returns: ``recon [N, *S]`` float32, the inputs ``x [N, *S]`` and ``labels [N]`` or None."""

    recon: torch.Tensor
    x: torch.Tensor
    labels: torch.Tensor | None


class Scores(NamedTuple):
    """What :func:`score` returns: ``scores`` (name → ``[N]`` float32, units in :data:`SCORE_UNITS`) and ``labels [N]`` or None."""

    scores: dict[str, torch.Tensor]
    labels: torch.Tensor | None


def resolve_run(run, device: str = "auto", pm=None) -> VAEModel:
    """The trained model of ``run`` (a run directory, a TrainResult or a model from :func:`vaekit.load_run`).

    A directory is loaded onto ``device`` (``auto``, ``cpu`` or ``cuda``) without touching the
    caller's RNG; a model stays where it is.  Raises CheckpointError for a missing or broken run,
    ConfigError for a model that carries no run config or an unknown device.
    """
    from .checkpoint import load_run
    from .config import Device
    from .registry import coerce
    from .training import resolve_device

    device = coerce(device, Device, "device")
    if hasattr(run, "run_dir") and not isinstance(run, VAEModel):  # a TrainResult
        run = run.run_dir
    if not isinstance(run, VAEModel):
        with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: not from the caller's RNG
            run = load_run(run, device=resolve_device(device), pm=pm)
    if getattr(run, "run_info", None) is None:
        raise ConfigError("this needs a run directory, a TrainResult or a model from vaekit.load_run "
                          "(this model carries no run config)")
    return run


def load_split(model: VAEModel, data=None, split: str = "test", pm=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The inputs ``x [N, *S]`` float32 (as loaded: not binarized) and labels ``[N]`` int64 (or None) of one split.

    ``data``: None for the run's own dataset as its ``config.json`` records it (options included),
    or a ``--data`` value or :class:`~vaekit.registry.PluginSpec` for another dataset.  ``split``:
    ``train``, ``test`` or ``all`` (train then test).  Raises ConfigError for an unknown split,
    DataError for data whose samples do not have the run's shape (or bad data), CheckpointError
    when the run's own dataset plugin is not installed.
    """
    from .checkpoint import missing_plugin_message
    from .errors import UnknownPluginError
    from .training import check_inputs, load_data

    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    info = model.run_info
    if data is None:
        try:
            bundle = load_data(model.config.data, pm)
        except UnknownPluginError as e:
            raise CheckpointError(missing_plugin_message(info.get("config", {}).get("out", "the run"), info, e)) from None
    else:
        bundle = load_data(data, pm)
    trained = tuple(info["data"]["shape"])
    if bundle.shape != trained:
        raise DataError(f"{bundle.name}: samples have shape {list(bundle.shape)}, but the run was trained on "
                        f"{info['data'].get('name', 'data')} of shape {list(trained)}")
    if split == "train":
        x, y = bundle.train_x, bundle.train_y
    elif split == "test":
        x, y = bundle.test_x, bundle.test_y
    else:
        x = torch.cat([bundle.train_x, bundle.test_x])
        y = None if bundle.train_y is None or bundle.test_y is None else torch.cat([bundle.train_y, bundle.test_y])
    check_inputs(model.likelihood, x, info.get("config", {}).get("binarize", "none"), f"the {split} split of {bundle.name}")
    return x, y


def embed(run, data=None, split: str = "test", batch_size: int = 500, device: str = "auto", pm=None) -> Codes:
    """The codes ``model.embed(x)`` of a split, ``[N, d]`` float32, and its labels: ``vaekit embed``.

    The codes are the features of :meth:`~vaekit.model.VAEModel.embed`: the posterior mean (the
    code itself for an autoencoder) after the regularizers' feature transforms — the code the decoder
    reads (a sparse AE's sigmoid, a k-sparse AE's top-k), except that a k-sparse AE with alpha > 1
    keeps ⌊αk + ½⌋ units here.  Batched without gradients.  Errors as in
    :func:`resolve_run` and :func:`load_split`; ConfigError for ``batch_size < 1``.
    """
    model = resolve_run(run, device, pm)
    x, y = load_split(model, data, split, pm)
    return Codes(map_batches(model, model.embed, x, batch_size, c=condition_labels(model, y)).float(), y)


def reconstruct(run, data=None, split: str = "test", batch_size: int = 500, device: str = "auto",
                pm=None) -> Reconstructions:
    """Reconstructions ``E[x | z = posterior mean]`` ``[N, *S]`` float32 of a split, its inputs and labels:
    ``vaekit reconstruct``.  Errors as in :func:`embed`."""
    model = resolve_run(run, device, pm)
    x, y = load_split(model, data, split, pm)
    return Reconstructions(map_batches(model, model.reconstruct, x, batch_size, c=condition_labels(model, y)).float(), x, y)


def anomaly_scores(model: VAEModel, x: torch.Tensor, nll_samples: int = 100, batch_size: int = 100,
                   seed: int = EVAL_SEED, progress: Callable[[int], None] | None = None,
                   c: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-sample anomaly scores of ``x [N, *S]`` (as loaded), each ``[N]`` float32, higher = more anomalous.

    * ``recon_error``: ‖x − E[x | z = posterior mean]‖² summed over the data dimensions (data
      units²), for every model;
    * ``neg_elbo``: −ELBO (nats), the one-sample estimate of :func:`~vaekit.evaluation.elbo_terms`
      seeded with ``seed`` (Kingma & Welling 2014, eq. 3), an upper bound on −log p(x);
    * ``nll``: −log p(x) by importance sampling with K = ``nll_samples`` (Burda et al. 2015,
      eq. 8; 0 skips it), its noise seeded with ``seed``.

    ``neg_elbo`` and ``nll`` are given for a VAE whose likelihood is a normalised density for its
    inputs, which follow the run's binarization as in ``vaekit eval``
    (:func:`vaekit.training.eval_inputs`: the fixed test binarization).  The caller's RNG is left
    alone.  ``progress(n)`` is called as the importance sampler finishes data points.  A conditional
    model needs the labels ``c [N]`` (its scores are then of x given its label).
    """
    from .training import eval_inputs

    if nll_samples < 0:
        raise ConfigError(f"the number of importance samples must be >= 0 (0 skips the NLL), got {nll_samples}")
    out = {"recon_error": reconstruction_error(model, x, batch_size, reduction="sum", c=c)}
    x_eval = eval_inputs(x, model.run_info["config"].get("binarize", "none"))
    if model.prior.stochastic and model.likelihood.normalized_for(x_eval):
        out["neg_elbo"] = -elbo_terms(model, x_eval, batch_size, seed=seed, c=c)["elbo"]
        if nll_samples > 0:
            with seeded_noise(seed, _device(model)):
                out["nll"] = -iwae_log_likelihood(model, x_eval, nll_samples, batch_size, progress=progress, c=c)
    return {k: v.float() for k, v in out.items()}


def score(run, data=None, split: str = "test", nll_samples: int = 100, batch_size: int = 100,
          device: str = "auto", seed: int = EVAL_SEED, pm=None,
          progress: Callable[[int], None] | None = None) -> Scores:
    """The :func:`anomaly_scores` of a split and its labels: ``vaekit score``.  Errors as in :func:`embed`."""
    model = resolve_run(run, device, pm)
    x, y = load_split(model, data, split, pm)
    return Scores(anomaly_scores(model, x, nll_samples, batch_size, seed, progress, c=condition_labels(model, y)), y)


def condition_labels(model: VAEModel, labels: torch.Tensor | None) -> torch.Tensor | None:
    """The labels a conditional model reads with its data (``labels [N]``); None for an unconditional model.

    Raises DataError for a conditional model and data without labels."""
    if not getattr(model, "conditional", False):
        return None
    if labels is None:
        raise DataError("this run is a conditional VAE (--condition label): it needs labelled data, and this data has no labels")
    return labels


def check_normal_class(labels: torch.Tensor | None, normal_class: int) -> None:
    """Raise DataError unless ``labels`` hold both ``normal_class`` and another class (what a ROC AUC needs)."""
    if labels is None:
        raise DataError("--normal-class needs labelled data, and this data has no labels")
    present = sorted(set(labels.tolist()))
    if normal_class not in present:
        raise DataError(f"normal class {normal_class} is not among the labels of the scored data "
                        f"({','.join(map(str, present))})")
    if len(present) == 1:
        raise DataError(f"every scored sample is of the normal class {normal_class}: a ROC AUC needs anomalies too "
                        "(score other classes, e.g. --data mnist for a run trained on mnist:classes=0)")


def anomaly_auc(scores: dict[str, torch.Tensor], labels: torch.Tensor | None, normal_class: int) -> dict[str, float | None]:
    """ROC AUC of each score at telling anomalies (label ≠ ``normal_class``) from normal samples.

    Higher scores count as more anomalous; 1 is a perfect ranking, 0.5 chance
    (``sklearn.metrics.roc_auc_score``).  None for a score with NaN/inf values.  Raises DataError
    as :func:`check_normal_class`.
    """
    from sklearn.metrics import roc_auc_score

    check_normal_class(labels, normal_class)
    anomalous = (labels != normal_class).numpy()
    return {name: float(roc_auc_score(anomalous, s.numpy())) if bool(torch.isfinite(s).all()) else None
            for name, s in scores.items()}
