"""Figures of a run: reconstructions, samples, latent space, learned manifold, interpolations, latent
traversals, loss curves, first-layer filters and a histogram of sparse codes (matplotlib)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from .checkpoint import atomic_write
from .errors import first_line
from .evaluation import map_batches
from .interfaces import Prior


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def as_images(x: torch.Tensor) -> np.ndarray | None:
    """``[N, *S]`` data as ``[N, H, W]`` or ``[N, H, W, 3]`` images in [0, 1]; None if not image-like.

    Vectors whose length is a perfect square are shown as square images.
    """
    x = x.detach().float().cpu()
    if x.dim() == 2:
        side = int(round(math.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            return None
        x = x.view(-1, 1, side, side)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        return None
    x = x.clamp(0, 1).numpy()
    return x[:, 0] if x.shape[1] == 1 else x.transpose(0, 2, 3, 1)


def image_grid(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """Tile ``[N, H, W(, 3)]`` images into one array with ``nrow`` images per row."""
    n, h, w = images.shape[:3]
    ncol = nrow
    rows = math.ceil(n / ncol)
    shape = (rows * (h + pad) + pad, ncol * (w + pad) + pad) + images.shape[3:]
    grid = np.ones(shape, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return grid


def save_figure(fig, path: Path) -> None:
    plt = _plt()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=100, bbox_inches="tight"))
    plt.close(fig)


def save_grid(x: torch.Tensor, path: Path, nrow: int = 8, title: str | None = None) -> bool:
    """Save ``[N, *S]`` samples as an image grid; False if the data is not image-like."""
    images = as_images(x)
    if images is None:
        return False
    plt = _plt()
    grid = image_grid(images, nrow)
    fig, ax = plt.subplots(figsize=(max(3, grid.shape[1] / 40), max(3, grid.shape[0] / 40)))
    ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return True


def save_pairs(x: torch.Tensor, recon: torch.Tensor, path: Path, n: int = 8) -> bool:
    """Pairs of rows of ``n`` images: data ``x [N, *S]`` (top) over ``recon [N, *S]`` (bottom), the first
    ``4 n`` samples; False (nothing written) if the data is not image-like."""
    x, recon = x[: n * 4].cpu(), recon[: n * 4].cpu()
    rows = []
    for i in range(0, len(x), n):
        rows += [x[i: i + n], recon[i: i + n]]
    return save_grid(torch.cat(rows), path, nrow=n, title="data (odd rows) / reconstruction (even rows)")


@torch.no_grad()
def plot_reconstructions(model, x: torch.Tensor, path: Path, n: int = 8, c: torch.Tensor | None = None) -> bool:
    """Pairs of rows: data (top) and reconstruction E[x|z = posterior mean] (bottom); a conditional
    model reconstructs with the true labels ``c [N]``."""
    x = x[: n * 4]
    return save_pairs(x, map_batches(model, model.reconstruct, x, c=_cond(model, c, n * 4)), path, n)


def _cond(model, c: torch.Tensor | None, n: int | None = None) -> torch.Tensor | None:
    """The first ``n`` labels for a conditional model, None for an unconditional one."""
    if not getattr(model, "conditional", False) or c is None:
        return None
    return c[:n] if n is not None else c


@torch.no_grad()
def plot_samples(model, path: Path, n: int = 64, seed: int = 0) -> bool:
    """``n`` samples ``E[x|z]`` as a grid; z comes from a CPU generator seeded with ``seed``, as in
    ``vaekit sample`` and the exported ``sample(n, seed)``, so the same seed gives the same
    samples whatever device the model is on.  A conditional model gets one row of 8 samples per label
    (``E[x|z, c]``, label 0 at the top), drawn label after label from that one generator."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    if getattr(model, "conditional", False):
        rows = [model.sample(8, gen, label=k).cpu() for k in range(model.num_classes)]
        return save_grid(torch.cat(rows), path, nrow=8, title="samples: E[x|z, c], one row per label c")
    return save_grid(model.sample(n, gen).cpu(), path, nrow=int(math.sqrt(n)) or 1, title="samples: E[x|z], z ~ p(z)")


@torch.no_grad()
def plot_latent(model, x: torch.Tensor, y: torch.Tensor | None, path: Path) -> None:
    """Scatter of the posterior means, coloured by label; the first two principal components when d > 2.

    With fewer than 3 points (a one-sample test split) there are fewer than two components: the
    missing ones are drawn as 0 (a component of a single point explains no variance)."""
    from sklearn.decomposition import PCA

    z = map_batches(model, model.embed, x, c=_cond(model, y)).numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    if z.shape[1] > 2:
        k = min(2, len(z) - 1)  # PCA of n points has at most n - 1 components of non-zero variance
        if k > 0:
            pca = PCA(n_components=k).fit(z)
            z2, ev = pca.transform(z), pca.explained_variance_ratio_ * 100
        else:
            z2, ev = np.zeros((len(z), 0)), np.zeros(0)
        z2 = np.concatenate([z2, np.zeros((len(z), 2 - k))], 1)
        ev = np.concatenate([ev, np.zeros(2 - k)])
        ax.set_xlabel(f"PC 1 ({ev[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC 2 ({ev[1]:.0f}% of variance)")
        ax.set_title(f"posterior means, PCA of z (d = {z.shape[1]})")
    else:
        z2 = z if z.shape[1] == 2 else np.concatenate([z, np.zeros_like(z)], 1)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        ax.set_title("posterior means")
    if y is not None and int(y.max()) < 20:  # a legend per class
        labels = y.numpy()
        cmap = plt.get_cmap("tab20" if labels.max() >= 10 else "tab10")
        for c in np.unique(labels):
            pts = z2[labels == c]
            ax.scatter(pts[:, 0], pts[:, 1], color=cmap(int(c)), s=6, alpha=0.8, label=str(c))
        ax.legend(title="label", markerscale=3, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    elif y is not None:
        sc = ax.scatter(z2[:, 0], z2[:, 1], c=y.numpy(), cmap="viridis", s=6, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="label")
    else:
        ax.scatter(z2[:, 0], z2[:, 1], s=6, alpha=0.8)
    save_figure(fig, path)


@torch.no_grad()
def plot_manifold(model, path: Path, n: int = 20, label: int = 0) -> bool:
    """Decoder means over a grid of z at the standard-normal quantiles 0.05..0.95 (Kingma & Welling 2014, fig. 4),
    each z made a code by :meth:`~vaekit.model.VAEModel.transform_latent` as in sampling; a conditional
    model decodes them all with the label ``label``."""
    if model.latent_dim != 2:
        return False
    model.eval()
    device = next(model.parameters()).device
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), -1).reshape(-1, 2)
    if getattr(model, "conditional", False):
        c = torch.full((len(zz),), label, dtype=torch.long, device=device)
        return save_grid(model.decode_mean(model.transform_latent(zz.to(device)), c).cpu(), path, nrow=n,
                         title=f"learned manifold of label {label}, z over N(0, I) quantiles")
    return save_grid(model.decode_mean(model.transform_latent(zz.to(device))).cpu(), path, nrow=n, title="learned manifold, z over N(0, I) quantiles")


def first_layer_filters(model) -> torch.Tensor | None:
    """The encoder's first-layer weights as images ``[F, *S]`` in [0, 1]; None where they are not images of the data.

    The first layer is the first module with weights of its own in the encoder, then the posterior
    head (registration order).  When it is an ``nn.Linear`` on the flattened input
    (``in_features = prod(S)``: the ``mlp`` encoder, a linear one), row j of its weight ``[F, D]``
    is the filter that hidden unit j takes the dot product with; it is reshaped to the data shape
    ``S`` and scaled by its own largest magnitude, ``0.5 + w_j / (2 max|w_j|)``, so grey is 0,
    white positive and black negative (filters drawn as images, as in Vincent et al. 2010).  A
    conditional model's first layer also reads the one-hot label: only its weights on the data are
    shown.  A convolutional first layer gives None.
    """
    from itertools import chain

    first = next((m for m in chain(model.encoder.modules(), model.head.modules())
                  if any(True for _ in m.parameters(recurse=False))), None)
    shape = tuple(model.data_shape)
    # a conditional model's first layer also reads the one-hot label (K planes, or K inputs for vectors)
    label_inputs = getattr(model, "num_classes", 0) * math.prod(shape[1:])
    if not isinstance(first, torch.nn.Linear) or first.in_features != math.prod(shape) + label_inputs:
        return None
    w = first.weight.detach().float().cpu()[:, : math.prod(shape)]  # [F, D]: the weights on the data
    scale = w.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (0.5 + w / (2 * scale)).reshape((w.shape[0],) + shape)


def plot_filters(model, path: Path, n: int = 100) -> bool:
    """The first ``n`` filters of :func:`first_layer_filters` as a grid; False (nothing written) for a
    model without such filters or data that is not image-like."""
    filters = first_layer_filters(model)
    if filters is None:
        return False
    total, filters = len(filters), filters[:n]
    return save_grid(filters, path, nrow=math.ceil(math.sqrt(len(filters))),
                     title=f"first-layer filters ({len(filters)} of {total}; grey = 0)")


def plot_code_histogram(codes: torch.Tensor, path: Path) -> None:
    """Histogram of every entry of the codes ``[N, d]`` (log counts), titled with their mean and the share
    that is exactly 0: how sparse a sparse or k-sparse autoencoder's codes are."""
    z = codes.detach().float().cpu().flatten().numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(z, bins=60, log=True)
    ax.set_xlabel("code activation")
    ax.set_ylabel("count (log scale)")
    ax.set_title(f"codes of {codes.shape[0]} test samples × {codes.shape[1]} units: mean {z.mean():.3g}, "
                 f"{(z == 0).mean():.0%} exactly 0", fontsize="medium")
    save_figure(fig, path)


def plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [m["epoch"] for m in history]
    if history and "train_loss" in history[0]:
        ax.plot(epochs, [m["train_loss"] for m in history], marker="o", label="train loss")
    if history and "test_elbo" in history[0]:
        ax.plot(epochs, [-m["test_elbo"] for m in history], marker="o", label="test −ELBO")
    elif history and "test_log_px" in history[0]:
        ax.plot(epochs, [-m["test_log_px"] for m in history], marker="o", label="test −log p(x|z)")
    elif history and "test_loss_recon" in history[0]:
        ax.plot(epochs, [m["test_loss_recon"] for m in history], marker="o", label="test reconstruction loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss per sample" if history and "test_loss_recon" in history[0] else "nats per sample")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


TRAVERSAL_MAX_DIM = 10
"""traversal.png is drawn for latent spaces of at most this many units (one row per unit)."""


def _pair_indices(y: torch.Tensor | None, n: int, pairs: int) -> list[tuple[int, int]]:
    """Index pairs of test points to interpolate between: with labels, the first point of each class
    to the first of the next class present (so each row crosses two classes); else (0, 1), (2, 3), …"""
    if y is not None:
        classes = sorted(set(y.tolist()))
        if len(classes) > 1:
            first = {int(c): int((y == c).nonzero()[0]) for c in classes}
            return [(first[classes[i]], first[classes[(i + 1) % len(classes)]]) for i in range(min(pairs, len(classes)))]
    return [(i, i + 1) for i in range(0, min(2 * pairs, n) - 1, 2)]


@torch.no_grad()
def plot_interpolation(model, x: torch.Tensor, y: torch.Tensor | None, path: Path, pairs: int = 8,
                       steps: int = 10) -> bool:
    """Decoded straight lines between the latent codes of pairs of test points ``x [N, *S]``.

    Row i: data point a, then ``E[x|code]`` for ``code = transform_latent((1 − t) μ_a + t μ_b)`` at ``steps``
    evenly spaced t from 0 to 1 (μ the posterior means, interpolated before the latent transform as
    sampling draws z before it), then data point b.  With labels ``y [N]`` each row joins the first
    test point of one class to that of the next class.  A conditional model encodes each point with
    its label and decodes the whole row with the label of a (the style moves from a's to b's, the
    class stays a's).  False (nothing written) for fewer than two points or data that are not images.
    """
    idx = _pair_indices(y, len(x), pairs)
    if not idx:
        return False
    model.eval()
    device = next(model.parameters()).device
    a, b = torch.tensor([i for i, _ in idx]), torch.tensor([j for _, j in idx])
    c = _cond(model, y)
    mean = _posterior_means(model, torch.cat([x[a], x[b]]), None if c is None else torch.cat([c[a], c[b]])).to(device)
    mu_a, mu_b = mean[: len(idx)], mean[len(idx):]
    t = torch.linspace(0, 1, steps, device=device)[None, :, None]  # [1, T, 1]
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # [P, T, d]
    c_rows = None if c is None else c[a].repeat_interleave(steps).to(device)
    decoded = model.decode_mean(model.transform_latent(z.reshape(-1, z.shape[-1])), c_rows).cpu()
    decoded = decoded.reshape((len(idx), steps) + tuple(decoded.shape[1:]))
    rows = torch.cat([x[a].cpu()[:, None].to(decoded.dtype), decoded, x[b].cpu()[:, None].to(decoded.dtype)], 1)
    return save_grid(rows.flatten(0, 1), path, nrow=steps + 2,
                     title="interpolation: data, decoded straight line between their codes, data")


def _posterior_means(model, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """Posterior means ``[N, d]`` (before any latent transform) of ``x [N, *S]``, with labels ``c [N]`` for a
    conditional model."""
    if c is None:
        return map_batches(model, lambda xb: model.prior.mean(model.encode(xb)), x)
    return map_batches(model, lambda xb, cb: model.prior.mean(model.encode(xb, cb)), x, c=c)


@torch.no_grad()
def latent_scale(model, x: torch.Tensor, n: int = 2000, seed: int = 0,
                 c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Centre and spread of each latent unit, ``(m [d], σ [d], what)``: p(z)'s mean and standard deviation
    where its distribution has them in closed form (N(0, I): 0 and 1); else those of ``n`` seeded draws
    from p(z) when the model can sample (mixtures, samplers of a prior's own); else those of the
    posterior means of ``x [N, *S]`` (a deterministic autoencoder's codes)."""
    try:
        p = model.sampling_distribution()
        if p is not None and type(model.prior).sample is Prior.sample:  # no sampler of the prior's own
            return p.mean.detach().float().cpu(), p.stddev.detach().float().cpu(), "p(z)"
    except NotImplementedError:  # no closed-form mean/stddev (or no distribution()): estimate below
        pass
    if model.can_sample:
        z = model.sample_latent(n, torch.Generator().manual_seed(seed)).float()
        what = "p(z)"
    else:
        z = _posterior_means(model, x, c).float()
        what = "the test codes"
    return z.mean(0), z.std(0) if len(z) > 1 else torch.ones(z.shape[1]), what


@torch.no_grad()
def plot_traversal(model, x: torch.Tensor, path: Path, steps: int = 11, span: float = 3.0,
                   y: torch.Tensor | None = None) -> bool:
    """Latent traversal (Higgins et al. 2017, fig. 7): row j sweeps unit j over ``m_j + t σ_j``,
    ``t`` in ``[−span, span]`` (``steps`` values), the other units fixed at the posterior mean of the first
    test point; ``m, σ`` from :func:`latent_scale` (for N(0, I): 0 and 1, so −3…3).  Each column is
    decoded as ``E[x|transform_latent(z)]`` (a conditional model: with the first test point's label
    ``y[0]``, which it is encoded with too).  Only for ``d ≤`` :data:`TRAVERSAL_MAX_DIM`; False (nothing
    written) above it, without data, or for data that are not images.
    """
    d = model.latent_dim
    if d > TRAVERSAL_MAX_DIM or len(x) == 0:
        return False
    model.eval()
    device = next(model.parameters()).device
    c = _cond(model, y)
    m, sd, what = latent_scale(model, x, c=c)
    base = _posterior_means(model, x[:1], None if c is None else c[:1])[0]  # [d]
    t = torch.linspace(-span, span, steps)
    z = base.repeat(d, steps, 1)  # [d, T, d]
    for j in range(d):
        z[j, :, j] = m[j] + t * sd[j]
    c_rows = None if c is None else c[:1].repeat(d * steps).to(device)
    decoded = model.decode_mean(model.transform_latent(z.reshape(-1, d).to(device)), c_rows).cpu()
    return save_grid(decoded, path, nrow=steps,
                     title=f"traversal: row j sweeps unit j over ±{span:g}σ of {what}, others at a test code")


FIGURES: dict[str, tuple[Callable[..., bool], str]] = {
    "reconstructions": (lambda m, ctx, p: plot_reconstructions(m, ctx.test_x, p, c=ctx.test_y), "image-like data"),
    "samples": (lambda m, ctx, p: m.can_sample and plot_samples(m, p), "a model that can sample and image-like data"),
    "latent": (lambda m, ctx, p: plot_latent(m, ctx.test_x, ctx.test_y, p) or True, "a model"),
    "manifold": (lambda m, ctx, p: m.can_sample and plot_manifold(m, p), "a model that can sample, with a 2-D latent space"),
    "interpolation": (lambda m, ctx, p: plot_interpolation(m, ctx.test_x, ctx.test_y, p), "two test points and image-like data"),
    "traversal": (lambda m, ctx, p: plot_traversal(m, ctx.test_x, p, y=ctx.test_y), f"a latent space of at most {TRAVERSAL_MAX_DIM} units and image-like data"),
    "loss": (lambda m, ctx, p: bool(ctx.history) and (plot_loss(ctx.history, p) or True), "a run with finished epochs"),
    "filters": (lambda m, ctx, p: plot_filters(m, p), "an encoder whose first layer is a Linear on the flattened images (e.g. mlp)"),
    "codes": (lambda m, ctx, p: any(getattr(r, "sparse_codes", False) for r in m.regularizers)
              and (plot_code_histogram(map_batches(m, m.embed, ctx.test_x, c=_cond(m, ctx.test_y)), p) or True),
              "a regularizer that makes the codes sparse"),
}
"""Every figure of a run: name -> (draw(model, ctx, path) -> written?, what it needs).  ``ctx`` has
``test_x [N, *S]`` (the evaluation inputs: a float tensor, or :class:`~vaekit.samples.Samples` whose rows
read as float32 the few at a time a figure shows), ``test_y [N]`` or None and ``history`` (metrics records);
the file is ``<name>.png``.  ``vaekit plot --kind NAME`` draws one."""


class FigureContext(NamedTuple):
    """What the figures read besides the model: test inputs, their labels and the run's metrics history."""

    test_x: Any  # torch.Tensor or vaekit.samples.Samples (read by rows: test_x[i:j], test_x[index])
    test_y: torch.Tensor | None
    history: list[dict[str, Any]]


def draw_figure(name: str, model, ctx: "FigureContext", path: Path) -> bool:
    """Draw the figure ``name`` of :data:`FIGURES` to ``path``; False if it does not apply to this run.
    Raises ConfigError (listing the names) for an unknown name."""
    _check_figure(name)
    return bool(FIGURES[name][0](model, ctx, Path(path)))


def _check_figure(name: str) -> None:
    """ConfigError, listing the figures, unless ``name`` is one of :data:`FIGURES`."""
    from .errors import ConfigError

    if name not in FIGURES:
        raise ConfigError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")


def write_run_figures(run_dir: Path, model, data, test_x, history: list[dict[str, Any]],
                      warn: Callable[[str], None] | None = None) -> list[str]:
    """Write every figure that applies to this run; returns the file names written.  ``test_x``: the
    evaluation inputs ``[N, *S]``, a float tensor or :class:`~vaekit.samples.Samples` (as :class:`FigureContext`).

    A figure that fails (a plugin that cannot sample, a full disk, …) is skipped with one line
    through ``warn`` (default: stderr); the run and the other figures are never lost to it.
    """
    run_dir = Path(run_dir)
    ctx = FigureContext(test_x, data.test_y, history)
    written = []
    for name in FIGURES:
        try:
            if draw_figure(name, model, ctx, run_dir / f"{name}.png"):
                written.append(f"{name}.png")
        except Exception as e:  # noqa: BLE001 - a figure is never worth the run
            _plt().close("all")
            first = first_line(e, 200, empty="")
            (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: {name}.png not written ({type(e).__name__}: {first})")
    return written


FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg")
"""The file types a figure can be written as (matplotlib's formats of those names)."""


def plot_run(run, kinds: list[str] | None = None, out: Path | None = None, data=None, split: str = "test",
             device: str = "auto", pm=None) -> list[Path]:
    """Draw figures of a trained run (``vaekit plot``); returns the files written.

    ``run``: a run directory, TrainResult or model from :func:`vaekit.load_run`.  ``kinds``: names of
    :data:`FIGURES` (default: every one that applies, as at the end of training).  Files go to
    ``out`` (one kind only) or ``<run dir>/<kind>.png``.  The data are the run's own split (or ``data``)
    with the run's evaluation binarization (:func:`vaekit.training.eval_inputs`), the history its
    ``metrics.jsonl``.  Raises ConfigError for an unknown kind, ``out`` with several kinds, or a kind
    named explicitly that does not apply to this run (saying what it needs); errors of
    :func:`vaekit.apply.load_split` for bad data.
    """
    from .apply import condition_labels, load_split, resolve_run
    from .checkpoint import check_output
    from .errors import ConfigError
    from .checkpoint import read_metrics
    from .training import eval_inputs

    names = list(kinds) if kinds else list(FIGURES)
    for name in names:  # every name checked before any work
        _check_figure(name)
    if out is not None:
        if len(names) != 1:
            raise ConfigError("--out names one file: give exactly one --kind with it")
        if Path(out).suffix.lower() not in FIGURE_SUFFIXES:
            raise ConfigError(f"--out must end in {', '.join(FIGURE_SUFFIXES)} (an image format), got {Path(out).name!r}")
        check_output(Path(out), "--out")
    model = resolve_run(run, device, pm)
    run_dir = Path(getattr(model, "run_dir", None) or model.run_info["config"]["out"])
    x, y = load_split(model, data, split, pm)
    condition_labels(model, y)  # a conditional run on data without labels: one DataError line
    x = eval_inputs(x, model.run_info["config"].get("binarize", "none"))
    history = [m for m in read_metrics(run_dir) if "stage" not in m] if run_dir.is_dir() else []
    ctx = FigureContext(x, y, history)
    written = []
    for name in names:
        path = Path(out) if out is not None else run_dir / f"{name}.png"
        if draw_figure(name, model, ctx, path):
            written.append(path)
        elif kinds:
            raise ConfigError(f"{name}.png does not apply to this run: it needs {FIGURES[name][1]}")
    return written
