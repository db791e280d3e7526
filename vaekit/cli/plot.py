"""``vaekit plot``: draw a trained run's figures again, or one of them to a file of your choice."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .apply import Data, Device, RunDir, Split


def register(app: typer.Typer) -> None:
    app.command("plot")(plot)


def plot(
    run_dir: RunDir,
    kind: Annotated[Optional[list[str]], typer.Option(
        help="Figure to draw (repeat for several): reconstructions, samples, latent, manifold, interpolation, "
             "traversal, loss, filters, codes. Default: every one that applies.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output image for a single --kind (default: RUN_DIR/<kind>.png).")] = None,
    data: Data = None,
    split: Split = "test",
    device: Device = "auto",
) -> None:
    """Draw figures of a trained run: interpolations between test codes, latent traversals (d <= 10),
    samples, reconstructions, the latent space, ... (the figures training writes at its end)."""
    from ..viz import plot_run

    written = plot_run(run_dir, kind, out, data, split, device)
    for path in written:
        typer.echo(f"wrote {path}")
