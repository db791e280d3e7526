"""``vaekit cluster RUN``: ACC / NMI / ARI of a run's clusters and of k-means on the same codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from vaekit.cli.apply import Data, Device, RunDir, Split


def register(app: typer.Typer) -> None:
    app.command("cluster")(cluster)


def cluster(
    run_dir: RunDir,
    data: Data = None,
    split: Split = "test",
    k: Annotated[Optional[int], typer.Option(
        "--k", help="Clusters for the k-means baseline. Default: the run's clustering regularizer's k, "
                    "else the number of classes in the labels.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the k-means baseline.")] = 0,
    out_dir: Annotated[Optional[Path], typer.Option(
        help="Folder for clusters.png and confusion.png (default: RUN_DIR).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    batch_size: Annotated[int, typer.Option(help="Inputs per batch when computing codes.")] = 500,
    device: Device = "auto",
) -> None:
    """Cluster a run's codes: ACC, NMI and ARI of the run's clustering regularizer (dec, dcn) and of
    k-means (the baseline, same k) on the same codes; writes clusters.png and confusion.png.

    A run without a clustering regularizer (any autoencoder or VAE) gets the k-means row alone.
    The codes are ``vaekit embed``'s (the posterior mean); the metrics need labelled data."""
    result = cluster_run(run_dir, data, split, k, seed, out_dir, batch_size, device)
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"vaekit cluster {run_dir} ({result['split']} split, {result['n']} samples)")
    for col in ("clusters", "k", "ACC", "NMI", "ARI"):
        table.add_column(col, justify="left" if col == "clusters" else "right")
    for name, row in result["methods"].items():
        table.add_row(name, str(row["k"]), *(f"{row[m]:.4f}" for m in ("acc", "nmi", "ari")))
    console = Console()
    console.print(table)
    if result["regularizer"] is None:
        console.print("this run has no clustering regularizer (dec, dcn): k-means on its codes only")
    for path in result["figures"]:
        console.print(f"wrote {path}")


def cluster_run(run_dir, data=None, split: str = "test", k: int | None = None, seed: int = 0,
                out_dir: Path | None = None, batch_size: int = 500, device: str = "auto", pm=None) -> dict:
    """What ``vaekit cluster`` reports, as a dict: ``split``, ``n``, ``regularizer`` (its name or None),
    ``methods`` (``{name: {"k", "acc", "nmi", "ari"}}``: the run's regularizer, then ``kmeans``) and
    ``figures`` (paths written).  Raises ConfigError for an unknown split, ``k < 2`` or a bad
    ``out_dir``, DataError for data without labels or k > samples, CheckpointError for a missing run."""
    from vaekit.apply import SPLITS, load_split, resolve_run
    from vaekit.checkpoint import check_output
    from vaekit.errors import ConfigError, DataError

    from . import assign_codes, clusterer_of, codes
    from .figures import plot_clusters, plot_confusion
    from .metrics import check_k, clustering_scores, kmeans

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if k is not None:  # refused before the run is loaded; k > samples is checked once they are
        check_k(k, what="--k")
    if seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {seed}")
    if out_dir is not None:
        check_output(Path(out_dir) / "clusters.png", "--out-dir")
    model = resolve_run(run_dir, device, pm)
    x, labels = load_split(model, data, split, pm)
    if labels is None:
        raise DataError(f"ACC, NMI and ARI compare clusters with labels, and the {split} split of "
                        f"{data or model.config.data.name} has none: give labelled data with --data")
    z = codes(model, x, labels, batch_size)
    reg = clusterer_of(model)
    methods: dict[str, dict] = {}
    shown = None
    if reg is not None:
        shown = assign_codes(reg, z)
        methods[reg.name] = {"k": int(reg.centroids.shape[0]), **clustering_scores(labels, shown)}
    k = k if k is not None else (int(reg.centroids.shape[0]) if reg is not None else len(labels.unique()))
    baseline = kmeans(z, k, seed)
    methods["kmeans"] = {"k": k, **clustering_scores(labels, baseline)}
    shown = baseline if shown is None else shown
    shown_name = next(iter(methods))
    folder = Path(out_dir) if out_dir is not None else Path(run_dir)
    figures = []
    acc = methods[shown_name]["acc"]
    if plot_clusters(x, shown, folder / "clusters.png", labels,
                     title=f"{shown_name} clusters of the {split} split (ACC {acc:.3f})"):
        figures.append(str(folder / "clusters.png"))
    plot_confusion(labels, shown, folder / "confusion.png", title=f"{shown_name}: cluster × label counts")
    figures.append(str(folder / "confusion.png"))
    return {"run_dir": str(run_dir), "split": split, "n": len(labels),
            "regularizer": reg.name if reg is not None else None, "methods": methods, "figures": figures}
