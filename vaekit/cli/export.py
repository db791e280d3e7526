"""``vaekit export``: write a trained run as a TorchScript archive for Python or the C++ runtime."""

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")],
    out: Annotated[Optional[Path], typer.Option(help="Output file (default RUN_DIR/model.pt, or model.pt2 for aoti).")] = None,
    format: Annotated[str, typer.Option("--format", help="torchscript (.pt) or aoti (.pt2, AOTInductor, compiled ahead of time).")] = "torchscript",
    no_sampling: Annotated[bool, typer.Option("--no-sampling", help="Export a model whose prior is not N(0, I) without sample() (encode/decode/reconstruct only).")] = False,
) -> None:
    """Export encode/decode/reconstruct/sample with the run's config inside, for Python or the C++ runtime."""
    from ..checkpoint import check_output, load_run
    from ..errors import ConfigError
    from ..export import export_aoti, export_torchscript
    from ..rundir import check_not_run_file

    writers = {"torchscript": (export_torchscript, "model.pt"), "aoti": (export_aoti, "model.pt2")}
    if format not in writers:
        raise ConfigError(f"unknown export format {format!r}; formats: {', '.join(writers)}")
    write, default_name = writers[format]
    path = out if out is not None else Path(run_dir) / default_name
    if out is not None:
        check_output(path, "--out")
        check_not_run_file(path, "--out")  # never over a run's own files (RUN/model.safetensors)
    model = load_run(run_dir)
    write(model, path, sampling=not no_sampling)
    typer.echo(f"exported to {path}")
