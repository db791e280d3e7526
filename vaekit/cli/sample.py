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
    from ..config import check_seed
    from ..errors import ConfigError, DataError, is_out_of_memory
    from ..viz import save_grid
    from .apply import save_arrays

    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    if nrow < 0:
        raise ConfigError(f"--nrow must be >= 0 (0: about √n per row), got {nrow}")
    check_seed(seed)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".npy"):
        raise ConfigError(f"--out must end in .png (an image grid) or .npy (the raw array), got {out.name!r}")
    check_output(out, "--out")
    model = load_run(run_dir)
    need, have = 4 * n * math.prod(model.data_shape), _physical_memory()
    if have and need > have:
        raise ConfigError(f"-n {n} samples of shape {list(model.data_shape)} need {need / 2**30:.3g} GiB "
                          f"and this machine has {have / 2**30:.3g} GiB: lower -n")
    if model.conditional and label is None:
        raise ConfigError(f"{str(run_dir)!r} is a conditional VAE (--condition label): give --label 0..{model.num_classes - 1}")
    if not model.conditional and label is not None:
        raise ConfigError(f"{str(run_dir)!r} is not conditional (trained without --condition label): drop --label")
    try:
        with torch.no_grad():
            x = model.sample(n, torch.Generator().manual_seed(seed), label=label).cpu().float()
    except Exception as e:  # noqa: BLE001 - only a failed allocation becomes a ConfigError
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"-n {n} samples do not fit in memory: lower -n") from None
    what = f"{n} samples" + ("" if label is None else f" of label {label}")
    if suffix == ".npy":
        save_arrays(out, "samples", x, None)
    elif not save_grid(x, out, nrow=nrow or max(1, int(math.sqrt(n)))):
        raise DataError(f"samples of shape {list(x.shape[1:])} are not images; write the raw array with --out samples.npy")
    typer.echo(f"{what} written to {out}")


def _physical_memory() -> int:
    """Bytes of physical memory of this machine (0 where the OS does not say)."""
    import os

    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
