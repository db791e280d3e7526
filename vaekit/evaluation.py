"""Evaluation: ELBO, importance-sampled NLL, reconstruction error — batched, no gradients."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .errors import ConfigError
from .model import VAEModel
from .rng import derived_seed, seeded_noise

EVAL_SEED = 0
"""Seed of the test-set ELBO's noise: training's per-epoch ``test_elbo`` and ``vaekit eval`` (``--seed``, default 0) both use it."""

ELBO_BATCH_SIZE = 500
"""Data points per forward pass of the test-set ELBO (training and :func:`evaluate` alike: the batches lay out the noise).
Under torchrun the test set is sharded by whole batches of this size (:func:`elbo_summary`)."""


def batch_seed(seed: int, batch: int) -> int:
    """The seed of evaluation batch ``batch``'s noise in a seeded :func:`elbo_terms`: ``seed`` itself for
    batch 0, else :func:`~vaekit.rng.derived_seed` ``(seed, batch)``.  Each batch has its own stream,
    so a batch's estimate does not depend on which process evaluates it, or after which batches."""
    return derived_seed(seed, batch)


def num_batches(n: int, batch_size: int = ELBO_BATCH_SIZE) -> int:
    """How many evaluation batches of ``batch_size`` hold ``n`` data points (the last may be short)."""
    return -(-n // batch_size)


def density_for(likelihood, x, batch_size: int = ELBO_BATCH_SIZE) -> bool:
    """Whether ``likelihood`` is a normalised density for every data point of ``x [N, *S]`` (a tensor or
    :class:`~vaekit.samples.Samples`): :meth:`~vaekit.interfaces.Likelihood.normalized_for` of each batch
    of ``batch_size`` rows, all of them (the property is one of each data point; the batches keep the
    float32 rows read at a time few).  What names the ELBO terms (:func:`elbo_summary`): decided once
    for a whole test set, never per shard."""
    return all(likelihood.normalized_for(x[i : i + batch_size]) for i in range(0, len(x), batch_size))


@torch.no_grad()
def elbo_terms(model: VAEModel, x, batch_size: int = ELBO_BATCH_SIZE,
               seed: int | None = None, c: torch.Tensor | None = None,
               batches: range | None = None) -> dict[str, torch.Tensor]:
    """Per-sample ``log_px`` (log p(x|z), one z ~ q(z|x)), ``kl`` and ``elbo = log_px − kl``, each ``[N]`` nats.

    ``x [N, *S]`` (a float tensor, or :class:`~vaekit.samples.Samples` read as float32 a batch at a
    time) is evaluated in batches of ``batch_size``; ``batches`` (default: all of them) selects
    which, by number (batch b is rows ``b·batch_size`` onwards), and the terms are those of their
    rows (``[0]`` for none).  With a ``seed`` the noise of batch b is drawn from the global RNG
    seeded with :func:`batch_seed` ``(seed, b)`` inside :func:`seeded_noise`, so the estimate is
    reproducible (for a given device, ``batch_size`` and model), each batch's the same whichever
    batches are evaluated with it, and the caller's RNG streams are left exactly as they were;
    ``seed=None`` draws from the caller's streams.  The estimate is the one-sample SGVB estimator
    of Kingma & Welling 2014 (§2.3), with the prior's KL.  A conditional model needs the labels
    ``c [N]`` and bounds log p(x|c) (Sohn et al. 2015, eq. 4, with the prior p(z|c) = p(z)).
    """
    was_training = model.training
    model.eval()
    log_px, kl = [torch.zeros(0)], [torch.zeros(0)]
    device = _device(model)
    for b in batches if batches is not None else range(num_batches(len(x), batch_size)):
        i = b * batch_size
        with seeded_noise(None if seed is None else batch_seed(seed, b), device):
            rec = model(x[i : i + batch_size].to(device), _rows(c, i, batch_size, device))
        log_px.append(rec.log_px.cpu())
        kl.append(rec.kl.cpu())
    model.train(was_training)
    lp, k = torch.cat(log_px), torch.cat(kl)
    return {"log_px": lp, "kl": k, "elbo": lp - k}


class ImportanceSampled(NamedTuple):
    """What :func:`importance_sampled_log_likelihood` returns, per data point.

    log_px: ``[N]`` nats, the estimate ``log (1/K) Σ_k w_k``; mc_var: ``[N]`` nats², its Monte-Carlo
    variance by the delta method, ``(mean_k w_k² / (mean_k w_k)² − 1) / K`` (the squared coefficient of
    variation of the weights over K; Owen 2013, "Monte Carlo theory, methods and examples", §9.2), itself
    estimated from the same K weights — a plug-in estimate that is optimistic when the weights are
    heavy-tailed (small K, a poor posterior): read it as a lower bound on the Monte-Carlo variance.
    """

    log_px: torch.Tensor
    mc_var: torch.Tensor


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: VAEModel,
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
    max_rows: int = 1024,
    progress: Callable[[float], None] | None = None,
    c: torch.Tensor | None = None,
) -> ImportanceSampled:
    """Importance-sampled ``log p(x) ≈ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)``, ``z_k ~ q(z|x)``, per data point,
    with the Monte-Carlo variance of each estimate (:class:`ImportanceSampled`).

    Burda et al. 2015 (eq. 8); ``K = 1`` is the ELBO, ``K = 5000`` the literature's protocol for the
    test NLL.  ``x [N, *S]`` is taken ``batch_size`` data points at a time, and their K samples in
    chunks of at most ``max_rows`` decoder rows (``max_rows // batch_size`` samples per chunk, at
    least one): memory is bounded by ``max_rows`` decoder rows whatever K, because each chunk is
    reduced to its log-sum-exp (and that of the squared weights) before the next is drawn.
    ``progress(n)`` is called after each chunk with the (fractional) number of data points it
    finished, so a bar over N moves steadily.  The noise comes from the caller's global RNG.  A
    conditional model needs the labels ``c [N]`` and estimates log p(x|c).

    Raises ConfigError for models without a stochastic prior (the bound is undefined), a likelihood
    that is not a normalised density for ``x``, ``num_samples < 1`` or ``batch_size < 1``.
    """
    if not model.prior.stochastic:
        raise ConfigError("the importance-sampled NLL needs a prior and posterior; this is a deterministic autoencoder (prior 'none')")
    if not density_for(model.likelihood, x):
        raise ConfigError(f"the NLL is undefined for the {type(model.likelihood).__name__} on this data: "
                          "it is a loss, not a normalised density (grey-level data under a Bernoulli likelihood: binarize it)")
    if num_samples < 1:
        raise ConfigError(f"the number of importance samples must be at least 1, got {num_samples}")
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = _device(model)
    p_z = model.prior.distribution()
    log_px, mc_var = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        b = xb.shape[0]
        cb = _rows(c, i, batch_size, device)
        q = model.prior.posterior(model.encode(xb, cb))
        chunk = max(1, min(num_samples, max_rows // b))
        lse_w, lse_w2 = [], []  # per chunk: log Σ w and log Σ w², [b] each
        for k0 in range(0, num_samples, chunk):
            k = min(chunk, num_samples - k0)
            z = q.rsample((k,))  # [k, b, d]
            params = model.decode(model.transform_latent(z.reshape(k * b, -1)), None if cb is None else cb.repeat(k))
            xk = xb.unsqueeze(0).expand((k,) + xb.shape).reshape((k * b,) + xb.shape[1:])
            log_w = model.likelihood.log_prob(params, xk).view(k, b) + p_z.log_prob(z) - q.log_prob(z)
            log_w = log_w.double()  # the sums of K = 5000 weights and of their squares
            lse_w.append(torch.logsumexp(log_w, 0))
            lse_w2.append(torch.logsumexp(2 * log_w, 0))
            if progress is not None:
                progress(b * k / num_samples)
        log_sum, log_sum2 = torch.logsumexp(torch.stack(lse_w), 0), torch.logsumexp(torch.stack(lse_w2), 0)
        # mean w² / (mean w)² = K Σw² / (Σw)²; its log is ≥ 0 up to rounding
        ratio = torch.exp(math.log(num_samples) + log_sum2 - 2 * log_sum)
        log_px.append((log_sum - math.log(num_samples)).float().cpu())
        mc_var.append(((ratio - 1).clamp_min(0) / num_samples).float().cpu())
    model.train(was_training)
    return ImportanceSampled(torch.cat(log_px), torch.cat(mc_var))


def iwae_log_likelihood(model: VAEModel, x: torch.Tensor, num_samples: int = 1000, batch_size: int = 100,
                        max_rows: int = 1024, progress: Callable[[float], None] | None = None,
                        c: torch.Tensor | None = None) -> torch.Tensor:
    """The importance-sampled ``log p(x)`` (``log p(x|c)`` with labels ``c``) ``[N]`` nats of
    :func:`importance_sampled_log_likelihood` (same arguments and errors), without its variance."""
    return importance_sampled_log_likelihood(model, x, num_samples, batch_size, max_rows, progress, c).log_px


@torch.no_grad()
def map_batches(model: VAEModel, fn: Callable[..., torch.Tensor], x: torch.Tensor,
                batch_size: int = 500, c: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` applied to ``x [N, *S]`` in batches of ``batch_size`` on the model's device, in eval mode
    and without gradients; the results are concatenated on the CPU (``[N, ...]``).  With labels ``c [N]``
    it is ``fn(x_batch, c_batch)`` (a conditional model's methods).

    ``map_batches(model, model.embed, x)`` are the features ``[N, d]``; the model's training mode is
    restored afterwards.  Raises ConfigError for ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        if c is None:
            return torch.cat([fn(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])
        return torch.cat([fn(x[i : i + batch_size].to(device), _rows(c, i, batch_size, device)).cpu()
                          for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def reconstruction_error(model: VAEModel, x: torch.Tensor, batch_size: int = 500,
                         reduction: str = "mean", c: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample squared error between ``x`` and ``E[x|z = posterior mean]``, ``[N]`` (data units²).

    ``reduction``: ``mean`` (the MSE, averaged over the data dimensions) or ``sum`` (summed over
    them: the anomaly score of ``vaekit score``).  A conditional model needs the labels ``c [N]``.
    """
    if reduction not in ("mean", "sum"):
        raise ConfigError(f"reduction must be 'mean' or 'sum', got {reduction!r}")

    def error(xb: torch.Tensor, cb: torch.Tensor | None = None) -> torch.Tensor:
        sq = (model.reconstruct(xb, cb) - xb).square().flatten(1)
        return sq.mean(1) if reduction == "mean" else sq.sum(1)

    return map_batches(model, error, x, batch_size, c=c)


def evaluate(model: VAEModel, x: torch.Tensor, nll_samples: int = 1000, batch_size: int = 100,
             progress: Callable[[int], None] | None = None, seed: int = EVAL_SEED,
             c: torch.Tensor | None = None) -> dict[str, float]:
    """Test-set summary: ``elbo``, ``log_px``, ``kl``, ``nll`` (importance-sampled, K = ``nll_samples``; 0 skips it), ``recon_mse``.

    With the NLL come its two standard errors (nats): ``nll_se``, the standard error of the mean over
    the test points (sample standard deviation of the per-point NLL over √N: how far another test
    set of the same size could move it), and ``nll_mc_se``, the Monte-Carlo standard error of this
    estimate for these points (√(Σ_i var_i)/N, var_i the delta-method variance of
    :class:`ImportanceSampled`: how far another seed could move it).

    Values are means over the samples, nats (``recon_mse`` in data units²).
    Where the likelihood is not a normalised density for ``x``
    (:meth:`~vaekit.interfaces.Likelihood.normalized_for`: a robust loss such as MCC,
    or grey-level data under a Bernoulli likelihood) the reconstruction term is
    reported as ``loss_recon`` and no ELBO or NLL is given.  The ELBO terms are the seeded
    estimate of :func:`elbo_terms` (``seed``, batches of :data:`ELBO_BATCH_SIZE`),
    the very estimate training logs as ``test_elbo`` each epoch (:data:`EVAL_SEED`),
    so on the same device the two agree.  ``batch_size`` is the importance
    sampler's; its noise comes from the caller's global RNG.  A conditional model needs the labels
    ``c [N]``; its ELBO and NLL are then bounds on log p(x|c).
    """
    out: dict[str, float] = {"n": len(x), **elbo_summary(model, x, seed, c=c)}
    if "elbo" in out and nll_samples > 0:
        est = importance_sampled_log_likelihood(model, x, nll_samples, batch_size, progress=progress, c=c)
        out["nll"] = float(-est.log_px.double().mean())
        out["nll_se"] = float(est.log_px.double().std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")
        out["nll_mc_se"] = float(est.mc_var.double().sum().sqrt() / len(x))
        out["nll_samples"] = nll_samples
    out["recon_mse"] = float(reconstruction_error(model, x, c=c).mean())
    return out


def evaluate_run(run, split: str = "test", nll_samples: int = 1000, batch_size: int = 100,
                 device: str = "auto", seed: int = EVAL_SEED, pm=None,
                 progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """:func:`evaluate` a trained run on its own data: what ``vaekit eval`` reports, for notebooks.

    ``run``: a run directory, a :class:`~vaekit.training.TrainResult`, or a model from
    :func:`vaekit.load_run` (which carries its config).
    ``split``: ``test`` or ``train``.  The data are loaded as the run was trained and binarized with
    the fixed test binarization when the run binarizes (:func:`vaekit.training.eval_inputs`), so
    ``vaekit.evaluate(run)["elbo"]`` equals the run's last ``test_elbo`` (default ``seed``, same
    device).  The importance sampler's noise is seeded with ``seed`` too.  Raises CheckpointError
    for a missing or broken run, ConfigError for an unknown split.
    """
    from .apply import load_split, resolve_run
    from .training import eval_inputs

    if split not in ("test", "train"):
        raise ConfigError(f"split must be 'test' or 'train', got {split!r}")
    model = resolve_run(run, device, pm)
    x, y = load_split(model, None, split, pm)
    x = eval_inputs(x, model.run_info["config"].get("binarize", "none"))
    c = y if getattr(model, "conditional", False) else None
    with seeded_noise(seed, _device(model)):  # the importance sampler's noise; the caller's RNG is left alone
        return evaluate(model, x, nll_samples, batch_size, progress=progress, seed=seed, c=c)


def elbo_summary(model: VAEModel, x, seed: int | None = EVAL_SEED, c: torch.Tensor | None = None,
                 normalized: bool | None = None, shard=None) -> dict[str, float]:
    """Means over ``x`` of the seeded :func:`elbo_terms`, named by what they are (nats):

    ``elbo``, ``log_px``, ``kl`` for a VAE whose likelihood is a density for ``x``; ``log_px`` for
    a deterministic autoencoder; ``loss_recon`` (= −log_prob, a loss) and, for a VAE, ``kl`` where
    the likelihood is not a normalised density for ``x`` (``normalized``; None: decided here on the
    whole of ``x`` by :func:`density_for`).  Training logs it each epoch with a ``test_`` prefix;
    :func:`evaluate` reports it as is.  ``x [N, *S]``: a float tensor or
    :class:`~vaekit.samples.Samples`.

    ``shard``: the processes under torchrun (:class:`vaekit.distributed.Single` or
    :class:`~vaekit.distributed.Distributed`, from ``connect``), each holding the whole ``x``.  The
    rank evaluates its contiguous share (``shard.share``) of the :data:`ELBO_BATCH_SIZE` batches,
    each seeded on its own (:func:`batch_seed`), and the per-batch sums are summed over the ranks
    (``shard.batch_sums``, every other rank adding 0.0 to a batch) and then over the batches in
    order: the result equals the one-process one exactly, for any number of ranks; a rank without a
    batch (fewer batches than ranks) adds nothing.  Pass ``normalized`` (decided on the whole test
    set) with it, so that every rank names the terms alike.
    """
    if normalized is None:
        normalized = density_for(model.likelihood, x)
    total = num_batches(len(x))
    lo, hi = shard.share(total) if shard is not None else (0, total)
    stochastic = model.prior.stochastic
    names = (("elbo", "log_px", "kl") if stochastic else ("log_px",)) if normalized else \
        (("loss_recon", "kl") if stochastic else ("loss_recon",))
    per_batch = {f"{name}@{b}": 0.0 for name in names for b in range(total)}  # sums, float64
    for b in range(lo, hi):  # each batch reduced to its sums at once: no per-sample tensors kept between batches
        terms = elbo_terms(model, x, seed=seed, c=c, batches=range(b, b + 1))
        terms["loss_recon"] = -terms["log_px"]
        for name in names:
            per_batch[f"{name}@{b}"] = float(terms[name].double().sum())
    if shard is not None:
        per_batch = shard.batch_sums(per_batch, hi - lo)[0]
    n = max(len(x), 1)
    return {name: math.fsum(per_batch[f"{name}@{b}"] for b in range(total)) / n for name in names}


def _rows(c: torch.Tensor | None, i: int, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """Rows ``i:i+batch_size`` of the labels ``c`` on ``device`` (None stays None)."""
    return None if c is None else c[i : i + batch_size].to(device)


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
