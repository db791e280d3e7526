"""``vaekit sample``: draw from a trained model's prior and save an image grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    app.command("sample")(sample)


def sample(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")],
    n: Annotated[int, typer.Option("-n", help="Number of samples.")] = 64,
    out: Annotated[Path, typer.Option(help="Output image (.png).")] = Path("samples.png"),
    seed: Annotated[int, typer.Option(help="Seed of z ~ p(z).")] = 0,
    nrow: Annotated[int, typer.Option(help="Images per row (default: √n).")] = 0,
) -> None:
    """Draw n samples E[x|z], z ~ p(z), and save them as an image grid."""
    import torch

    from ..checkpoint import check_output, load_run
    from ..errors import ConfigError, DataError
    from ..viz import save_grid

    if n < 1:
        raise ConfigError(f"-n must be at least 1, got {n}")
    check_output(out, "--out")
    model = load_run(run_dir)
    x = model.sample(n, torch.Generator().manual_seed(seed))
    if not save_grid(x, out, nrow=nrow or max(1, int(math.sqrt(n)))):
        raise DataError(f"samples of shape {list(x.shape[1:])} are not images; nothing written")
    typer.echo(f"{n} samples written to {out}")
