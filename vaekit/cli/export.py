"""``vaekit export``: write a trained run as a TorchScript archive for Python or the C++ runtime."""

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")],
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN_DIR/model.pt).")] = None,
    format: Annotated[str, typer.Option("--format", help="torchscript (the .pt2 AOTInductor format is planned).")] = "torchscript",
) -> None:
    """Export encode/decode/reconstruct/sample as one TorchScript archive with the run's config inside."""
    from ..checkpoint import load_run
    from ..errors import ConfigError
    from ..export import export_torchscript

    if format != "torchscript":
        raise ConfigError(f"unknown export format {format!r}; formats: torchscript")
    model = load_run(run_dir)
    path = out if out is not None else Path(run_dir) / "model.pt"
    if not path.parent.exists():
        raise ConfigError(f"output folder {str(path.parent)!r} does not exist")
    export_torchscript(model, path)
    typer.echo(f"exported to {path}")
