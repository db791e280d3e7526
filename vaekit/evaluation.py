"""Evaluation: ELBO, importance-sampled NLL, reconstruction error — batched, no gradients."""

from __future__ import annotations

import math
import time
from copy import deepcopy
from typing import Callable, NamedTuple

import torch

from . import malloc
from .errors import ConfigError
from .model import VAEModel
from .rng import derived_seed, seeded_noise

EVAL_SEED = 0
"""Seed of the test-set ELBO's noise: training's per-epoch ``test_elbo`` and ``vaekit eval`` (``--seed``, default 0) both use it."""

ELBO_BATCH_SIZE = 500
"""Data points per batch of the test-set ELBO (training and :func:`evaluate` alike: the batches lay out the noise).
Under torchrun the test set is sharded by whole batches of this size (:func:`elbo_summary`)."""

ELBO_CHUNK_ROWS = 128
"""Data points the encoder and decoder of the test-set ELBO see at once (:func:`elbo_terms`; the
model's ``forward(..., chunk_rows=)``): a batch's noise is drawn for the whole batch, its networks run
in chunks of this size, so the networks' activations alive at once are those of 128 points (the default
training batch), not of the batch's 500: with the README's conv VAE, a batch of 500 at once had raised
the training run's peak RSS by 9-40 MiB."""


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
    ``seed=None`` draws from the caller's streams.  A batch's networks run :data:`ELBO_CHUNK_ROWS`
    points at a time (one draw of noise for the batch).  The estimate is the one-sample SGVB estimator
    of Kingma & Welling 2014 (§2.3), with the prior's KL.  A conditional model needs the labels
    ``c [N]`` and bounds log p(x|c) (Sohn et al. 2015, eq. 4, with the prior p(z|c) = p(z)).
    """
    was_training = model.training
    model.eval()
    log_px, kl = [torch.zeros(0)], [torch.zeros(0)]
    device = _device(model)
    for b in batches if batches is not None else range(num_batches(len(x), batch_size)):
        i = b * batch_size
        xb, cb = x[i : i + batch_size].to(device), _rows(c, i, batch_size, device)
        if not len(xb):  # a batch past the end: no terms (a conv decoder cannot run on no rows)
            continue
        with seeded_noise(None if seed is None else batch_seed(seed, b), device):
            rec = model(xb, cb, chunk_rows=ELBO_CHUNK_ROWS)
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


CPU_CHUNK_BYTES = 24 * 2**20
"""Default memory budget of one importance-sampling chunk on the CPU, bytes (24 MiB).  Measured, not guessed:
on 2 CPU cores the decoder's rows per second fall once a chunk's working set leaves the caches (the
README's conv VAE: ~14,000 rows/s at 128-512 rows a chunk, 8,500 at 1,024, 7,300 at 2,048; the MLP
784-400-20: ~150,000 at 256-1,024 rows, 78,000 at 2,048), so the CPU's budget is cache-sized: 130 rows
of the conv VAE (:func:`decoder_row_bytes` 192 KB), 1,317 of the MLP (19 KB)."""

ACCELERATOR_CHUNK_BYTES = 2**30
"""Default memory budget of one importance-sampling chunk on a GPU (or any non-CPU device), bytes (1 GiB):
there the largest chunk is the fastest.  Not measured here (no GPU was available)."""


def default_chunk_bytes(device: torch.device) -> int:
    """The default memory budget of an importance-sampling chunk on ``device``, bytes:
    :data:`CPU_CHUNK_BYTES` on the CPU, else :data:`ACCELERATOR_CHUNK_BYTES`."""
    return CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_BYTES


def decoder_row_bytes(model: VAEModel, c: torch.Tensor | None = None) -> int:
    """Estimated bytes one decoder row (one code ``z``) needs while it is decoded and scored, for
    :func:`importance_sampled_log_likelihood`'s memory budget.

    Counted on a probe of two rows: the inputs and outputs of every leaf module of the decoder (each
    layer's activations: an upper bound on what a feed-forward decoder keeps alive at once, which also
    covers a layer's hidden intermediates such as the column buffers of a CPU transposed convolution,
    when they are about its input's size), plus twice the decoder's output
    (the likelihood's temporaries in ``log_prob``: the eager formulas make about two; the fused CPU
    Bernoulli op none, so there it is margin), plus the data row (the sampler repeats the batch once
    per draw) and the code.  For the README's conv VAE it gives 192 KB a row against a measured
    allocator peak of 63 KB, for the MLP 784-400-20 19 KB against 6.3 KB (torch.profiler's memory
    events of decoding and scoring a 256-row chunk with its data copy, fused Bernoulli op).  ``c``:
    labels of a conditional model (its first row is used).
    """
    device = _device(model)
    sizes: list[int] = []

    def count(module, args, out):
        for t in (*args, out):  # the input too: it covers a layer's hidden intermediates of about its size
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    leaves = [m for m in model.decoder.modules() if next(m.children(), None) is None]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            code = torch.zeros(2, model.latent_dim, device=device)
            params = model.decode(code, None if c is None else c[:1].to(device).repeat(2))
    finally:
        for h in hooks:
            h.remove()
    data = math.prod(model.data_shape) * 4
    return (sum(sizes) + 2 * params.numel() * params.element_size()) // 2 + data + model.latent_dim * 4


def importance_sampled_log_likelihood(
    model: VAEModel,
    x: torch.Tensor,
    num_samples: int = 1000,
    batch_size: int = 100,
    max_rows: int | None = None,
    progress: Callable[[float], None] | None = None,
    c: torch.Tensor | None = None,
    *,
    memory_budget: int | None = None,
    compile: bool = False,
) -> ImportanceSampled:
    """Importance-sampled ``log p(x) ≈ log (1/K) Σ_k p(x|z_k) p(z_k) / q(z_k|x)``, ``z_k ~ q(z|x)``, per data point,
    with the Monte-Carlo variance of each estimate (:class:`ImportanceSampled`).

    Burda et al. 2015 (eq. 8); ``K = 1`` is the ELBO, ``K = 5000`` the literature's protocol for the
    test NLL.  ``x [N, *S]`` is taken ``batch_size`` data points at a time; all K draws of a batch,
    ``z [K, batch_size, d]``, are drawn at once from the caller's global RNG (so the estimate does
    not depend on the chunking below, only on ``batch_size``), and decoded in chunks of rows
    (draw k of point n is row ``k·batch_size + n``): whole draws of the batch when a chunk holds
    at least ``batch_size`` rows, else a range of the batch's points for one draw.  A chunk holds
    at most ``memory_budget // decoder_row_bytes(model)`` rows (:func:`decoder_row_bytes`, bytes
    per row; at least one): ``memory_budget`` is in bytes, default :func:`default_chunk_bytes`
    (24 MiB on the CPU, where cache-sized chunks are the fastest; 1 GiB elsewhere).  ``max_rows``
    (decoder rows) bounds a chunk too; given alone, it replaces the default budget.  Besides the
    chunk, a batch holds its draws and log-weights, ``K · batch_size · (d + 3) · 4`` bytes (38 MB
    for K = 5000, 100 points, d = 16).  The
    log-sum-exp of the weights (and of their squares) is taken in float64.  Runs under
    ``torch.inference_mode``; the returned tensors are ordinary ones.  ``compile=True`` decodes
    and scores the chunks with ``torch.compile`` (dynamic=False: one compilation per chunk shape,
    seconds each; it pays only for long runs such as K = 5000 of a conv decoder).
    ``progress(n)`` is called after each chunk with the (fractional) number of data points it
    finished, so a bar over N moves steadily.  A conditional model needs the labels ``c [N]`` and
    estimates log p(x|c).

    Raises ConfigError for models without a stochastic prior (the bound is undefined), a likelihood
    that is not a normalised density for ``x``, ``num_samples < 1``, ``batch_size < 1``,
    ``max_rows < 1`` or ``memory_budget < 1``.
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
    if max_rows is not None and max_rows < 1:
        raise ConfigError(f"max_rows must be at least 1 decoder row, got {max_rows}")
    if memory_budget is not None and memory_budget < 1:
        raise ConfigError(f"the memory budget must be at least 1 byte, got {memory_budget}")
    was_training = model.training
    model.eval()
    device = _device(model)
    budget = default_chunk_bytes(device) if memory_budget is None else memory_budget
    if max_rows is None or memory_budget is not None:
        rows = max(1, budget // decoder_row_bytes(model, c))
        rows = rows if max_rows is None else min(rows, max_rows)
    else:  # the caller's bound on rows alone
        rows = max_rows

    decoding = _channels_last(model)

    def score(code: torch.Tensor, xr: torch.Tensor, cr: torch.Tensor | None) -> torch.Tensor:
        return decoding.likelihood.log_prob(decoding.decode(code, cr), xr)

    if compile:
        score = torch.compile(score, dynamic=False)
    p_z = model.prior.distribution()
    log_px, mc_var = [], []
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                xb = x[i : i + batch_size].to(device)
                cb = _rows(c, i, batch_size, device)
                lw = _log_weights(model, p_z, score, xb, cb, num_samples, rows, budget, progress)  # [K, b] float64
                log_sum, log_sum2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)
                # mean w² / (mean w)² = K Σw² / (Σw)²; its log is ≥ 0 up to rounding
                ratio = torch.exp(math.log(num_samples) + log_sum2 - 2 * log_sum)
                log_px.append((log_sum - math.log(num_samples)).float().cpu())
                mc_var.append(((ratio - 1).clamp_min(0) / num_samples).float().cpu())
    finally:
        model.train(was_training)
    return ImportanceSampled(torch.cat(log_px).clone(), torch.cat(mc_var).clone())  # clones: not inference tensors


def _log_weights(model: VAEModel, p_z, score, xb: torch.Tensor, cb: torch.Tensor | None, k_all: int, rows: int,
                 budget: int, progress: Callable[[float], None] | None) -> torch.Tensor:
    """The importance log-weights ``log p(x|z_k) + log p(z_k) − log q(z_k|x)`` ``[K, b]`` (float64) of the
    points ``xb [b, *S]``, the K draws made at once and decoded ``rows`` rows a chunk at most."""
    b = xb.shape[0]
    q = model.prior.posterior(model.encode(xb, cb))
    z = q.rsample((k_all,))  # [K, b, d], one draw whatever the chunking
    per = max(1, rows // b)  # draws per chunk when whole draws fit
    block = max(per, budget // (16 * b * z.shape[-1]))  # draws per log-density pass: ~4 float32 temporaries of z
    lw = torch.cat([p_z.log_prob(z[k : k + block]) - q.log_prob(z[k : k + block]) for k in range(0, k_all, block)])
    lw = lw.double()
    if rows >= b:  # chunks of whole draws: rows k·b + n, their data and labels repeated once per batch
        xr = xb.repeat((per,) + (1,) * (xb.dim() - 1))
        cr = None if cb is None else cb.repeat(per)
        for k in range(0, k_all, per):
            n = min(per, k_all - k)
            code = model.transform_latent(z[k : k + n].reshape(n * b, -1))
            lw[k : k + n] += score(code, xr[: n * b], None if cr is None else cr[: n * b]).view(n, b)
            if progress is not None:
                progress(b * n / k_all)
        return lw
    step = -(-b // -(-b // rows))  # the points split evenly into as few ranges as fit (no small remainder)
    for k in range(k_all):  # chunks of a range of the points for one draw
        for j in range(0, b, step):
            code = model.transform_latent(z[k, j : j + step])
            lw[k, j : j + step] += score(code, xb[j : j + step], None if cb is None else cb[j : j + step])
            if progress is not None:
                progress(code.shape[0] / k_all)
    return lw


def iwae_log_likelihood(model: VAEModel, x: torch.Tensor, num_samples: int = 1000, batch_size: int = 100,
                        max_rows: int | None = None, progress: Callable[[float], None] | None = None,
                        c: torch.Tensor | None = None, *, memory_budget: int | None = None,
                        compile: bool = False) -> torch.Tensor:
    """The importance-sampled ``log p(x)`` (``log p(x|c)`` with labels ``c``) ``[N]`` nats of
    :func:`importance_sampled_log_likelihood` (same arguments and errors), without its variance."""
    return importance_sampled_log_likelihood(model, x, num_samples, batch_size, max_rows, progress, c,
                                             memory_budget=memory_budget, compile=compile).log_px


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
             c: torch.Tensor | None = None, *, memory_budget: int | None = None,
             compile: bool = False) -> dict[str, float]:
    """Test-set summary: ``elbo``, ``log_px``, ``kl``, ``nll`` (importance-sampled, K = ``nll_samples``; 0 skips it), ``recon_mse``.

    With the NLL come its two standard errors (nats): ``nll_se``, the standard error of the mean over
    the test points (sample standard deviation of the per-point NLL over √N: how far another test
    set of the same size could move it), and ``nll_mc_se``, the Monte-Carlo standard error of this
    estimate for these points (√(Σ_i var_i)/N, var_i the delta-method variance of
    :class:`ImportanceSampled`: how far another seed could move it).  With them come the sampler's
    wall-clock time ``nll_seconds`` (s, the encoder's and decoder's passes and the reductions) and its
    throughput ``nll_rows_per_s`` (decoder rows per second, N·K / ``nll_seconds``).

    Values are means over the samples, nats (``recon_mse`` in data units²).
    Where the likelihood is not a normalised density for ``x``
    (:meth:`~vaekit.interfaces.Likelihood.normalized_for`: a robust loss such as MCC,
    or grey-level data under a Bernoulli likelihood) the reconstruction term is
    reported as ``loss_recon`` and no ELBO or NLL is given.  The ELBO terms are the seeded
    estimate of :func:`elbo_terms` (``seed``, batches of :data:`ELBO_BATCH_SIZE`),
    the very estimate training logs as ``test_elbo`` each epoch (:data:`EVAL_SEED`),
    so on the same device the two agree.  ``batch_size`` is the importance
    sampler's, and so are ``memory_budget`` (bytes a chunk, :func:`default_chunk_bytes` by
    default) and ``compile``; its noise comes from the caller's global RNG.  A conditional model
    needs the labels ``c [N]``; its ELBO and NLL are then bounds on log p(x|c).
    """
    if _device(model).type == "cpu":
        malloc.keep_freed_memory()  # the chunks' buffers reuse the last chunk's pages (vaekit.malloc)
    out: dict[str, float] = {"n": len(x), **elbo_summary(model, x, seed, c=c)}
    if "elbo" in out and nll_samples > 0:
        start = time.perf_counter()
        est = importance_sampled_log_likelihood(model, x, nll_samples, batch_size, progress=progress, c=c,
                                                memory_budget=memory_budget, compile=compile)
        seconds = time.perf_counter() - start
        out["nll"] = float(-est.log_px.double().mean())
        out["nll_se"] = float(est.log_px.double().std() / math.sqrt(len(x))) if len(x) > 1 else float("nan")
        out["nll_mc_se"] = float(est.mc_var.double().sum().sqrt() / len(x))
        out["nll_samples"] = nll_samples
        out["nll_seconds"] = seconds
        out["nll_rows_per_s"] = len(x) * nll_samples / seconds
    out["recon_mse"] = float(reconstruction_error(model, x, c=c).mean())
    return out


def evaluate_run(run, split: str = "test", nll_samples: int = 1000, batch_size: int = 100,
                 device: str = "auto", seed: int = EVAL_SEED, pm=None,
                 progress: Callable[[int], None] | None = None, *, memory_budget: int | None = None,
                 compile: bool = False) -> dict[str, float]:
    """:func:`evaluate` a trained run on its own data: what ``vaekit eval`` reports, for notebooks.

    ``run``: a run directory, a :class:`~vaekit.training.TrainResult`, or a model from
    :func:`vaekit.load_run` (which carries its config).
    ``split``: ``test`` or ``train``.  The data are loaded as the run was trained and binarized with
    the fixed test binarization when the run binarizes (:func:`vaekit.training.eval_inputs`), so
    ``vaekit.evaluate(run)["elbo"]`` equals the run's last ``test_elbo`` (default ``seed``, same
    device).  The importance sampler's noise is seeded with ``seed`` too; ``memory_budget`` (bytes a
    chunk) and ``compile`` are :func:`importance_sampled_log_likelihood`'s.  Raises CheckpointError
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
        return evaluate(model, x, nll_samples, batch_size, progress=progress, seed=seed, c=c,
                        memory_budget=memory_budget, compile=compile)


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


def _channels_last(model: VAEModel) -> VAEModel:
    """``model`` itself, or, when its decoder holds 4-D (convolution) weights, a copy whose decoder is in the
    channels-last memory format: the CPU's transposed convolutions run ~7% faster so (the README's conv VAE,
    1 thread, interleaved runs).  The caller's model is left as it is; a decoder already stored
    channels-last (or without 4-D weights) is used as it is."""
    kernels = [p for p in model.decoder.parameters() if p.dim() == 4]
    if all(p.is_contiguous(memory_format=torch.channels_last) for p in kernels):
        return model
    copy = deepcopy(model)
    copy.decoder.to(memory_format=torch.channels_last)
    return copy


def _rows(c: torch.Tensor | None, i: int, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """Rows ``i:i+batch_size`` of the labels ``c`` on ``device`` (None stays None)."""
    return None if c is None else c[i : i + batch_size].to(device)


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
