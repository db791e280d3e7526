"""``vaekit sample``: draw from a trained model's prior and save an image grid or the raw array."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 64,
    out: Annotated[Path, typer.Option(help="Output: an image grid (.png) or the raw [n, *S] float32 array (.npy).")] = Path("samples.png"),
    seed: Annotated[int, typer.Option(help="Seed of z ~ p(z).")] = 0,
    nrow: Annotated[int, typer.Option(help="Images per row (default: √n).")] = 0,
    label: Annotated[Optional[int], typer.Option(help="The label c to generate (a run trained with --condition label needs it; others refuse it).")] = None,
) -> None:
    """Draw n samples E[x|z] (E[x|z, c = label] for a conditional run), z ~ p(z), and save them as an
    image grid (.png) or as the raw [n, *S] float32 array (.npy)."""
    import torch

    from ..checkpoint import check_output, load_run
    from ..errors import ConfigError, DataError
    from ..viz import save_grid
    from .apply import save_arrays

    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise ConfigError(f"--out must end in .png (an image grid) or .npy (the raw array), got {out.name!r}")
    check_output(out, "--out")
    model = load_run(run_dir)
    if model.conditional and label is None:
        raise ConfigError(f"{str(run_dir)!r} is a conditional VAE (--condition label): give --label 0..{model.num_classes - 1}")
    if not model.conditional and label is not None:
        raise ConfigError(f"{str(run_dir)!r} is not conditional (trained without --condition label): drop --label")
    with torch.no_grad():
        x = model.sample(n, torch.Generator().manual_seed(seed), label=label).cpu().float()
    what = f"{n} samples" + ("" if label is None else f" of label {label}")
    if suffix == ".npy":
        save_arrays(out, "samples", x, None)
    elif not save_grid(x, out, nrow=nrow or max(1, int(math.sqrt(n)))):
        raise DataError(f"samples of shape {list(x.shape[1:])} are not images; write the raw array with --out samples.npy")
    typer.echo(f"{what} written to {out}")
