"""Figures of a run: reconstructions, samples, latent space, learned manifold, loss curves, first-layer
filters and a histogram of sparse codes (matplotlib)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import atomic_write
from .errors import first_line
from .evaluation import map_batches


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
    """Scatter of the posterior means, coloured by label; the first two principal components when d > 2."""
    from sklearn.decomposition import PCA

    z = map_batches(model, model.embed, x, c=_cond(model, y)).numpy()
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    if z.shape[1] > 2:
        pca = PCA(n_components=2).fit(z)
        z2 = pca.transform(z)
        ev = pca.explained_variance_ratio_ * 100
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
    convolutional first layer gives None.
    """
    from itertools import chain

    first = next((m for m in chain(model.encoder.modules(), model.head.modules())
                  if any(True for _ in m.parameters(recurse=False))), None)
    shape = tuple(model.data_shape)
    if not isinstance(first, torch.nn.Linear) or first.in_features != math.prod(shape):
        return None
    w = first.weight.detach().float().cpu()  # [F, D]
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


def write_run_figures(run_dir: Path, model, data, test_x: torch.Tensor, history: list[dict[str, Any]],
                      warn: Callable[[str], None] | None = None) -> list[str]:
    """Write every figure that applies to this run; returns the file names written.

    A figure that fails (a plugin that cannot sample, a full disk, …) is skipped with one line
    through ``warn`` (default: stderr); the run and the other figures are never lost to it.
    """
    run_dir = Path(run_dir)
    figures = [
        ("reconstructions.png", lambda p: plot_reconstructions(model, test_x, p, c=data.test_y)),
        ("samples.png", lambda p: model.can_sample and plot_samples(model, p)),
        ("latent.png", lambda p: plot_latent(model, test_x, data.test_y, p) or True),
        ("manifold.png", lambda p: model.can_sample and plot_manifold(model, p)),
        ("loss.png", lambda p: bool(history) and (plot_loss(history, p) or True)),
        ("filters.png", lambda p: plot_filters(model, p)),
        ("codes.png", lambda p: any(getattr(r, "sparse_codes", False) for r in model.regularizers)
         and (plot_code_histogram(map_batches(model, model.embed, test_x, c=_cond(model, data.test_y)), p) or True)),
    ]
    written = []
    for name, draw in figures:
        try:
            if draw(run_dir / name):
                written.append(name)
        except Exception as e:  # noqa: BLE001 - a figure is never worth the run
            _plt().close("all")
            first = first_line(e, 200, empty="")
            (warn or (lambda m: print(m, file=sys.stderr)))(f"warning: {name} not written ({type(e).__name__}: {first})")
    return written
