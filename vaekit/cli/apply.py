"""``vaekit embed``, ``vaekit reconstruct`` and ``vaekit score``: a trained run applied to data.

Thin commands over :mod:`vaekit.apply`; the options they share are defined once here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

RunDir = Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")]
Data = Annotated[Optional[str], typer.Option(
    help="Dataset to apply the run to (a --data value of 'vaekit run', e.g. mnist or digits:classes=0,3); "
         "its samples must have the run's shape. Default: the run's own dataset as recorded in its config.json.")]
Split = Annotated[str, typer.Option(help="train, test, or all (train then test).")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
    app.command("reconstruct")(reconstruct)
    app.command("score")(score)


def _check_options(out: Path, suffixes: tuple[str, ...], batch_size: int, split: str) -> None:
    """Refuse bad options before a run is loaded: the output's suffix and folder, the batch size, the split."""
    from ..apply import SPLITS
    from ..checkpoint import check_output
    from ..errors import ConfigError

    if out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out must end in {' or '.join(suffixes)}, got {out.name!r}")
    check_output(out, "--out")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")


def labels_path(out: Path) -> Path:
    """Where the labels beside a ``.npy`` output go: ``codes.npy`` → ``codes.labels.npy``."""
    return out.with_name(out.stem + ".labels.npy")


def save_arrays(out: Path, name: str, values, labels) -> str:
    """Write ``values`` (float32) and ``labels`` (int64, if any) atomically; returns what was written, in words.

    ``.npy``: ``values`` in ``out`` and the labels in :func:`labels_path` (removed there when the data
    has no labels, so no stale labels sit beside new values); ``.npz``: arrays ``name`` and ``labels``
    in one file.
    """
    import numpy as np

    from ..checkpoint import atomic_write

    def write_npy(path: Path, array) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array)

        atomic_write(path, write)

    array = values.numpy().astype(np.float32, copy=False)
    label_array = None if labels is None else labels.numpy().astype(np.int64, copy=False)
    if out.suffix.lower() == ".npz":
        arrays = {name: array} if label_array is None else {name: array, "labels": label_array}

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(out, write)
        return f"{out} ({', '.join(arrays)})"
    write_npy(out, array)
    if label_array is None:
        labels_path(out).unlink(missing_ok=True)  # a labels file of earlier codes would not match these
        return str(out)
    write_npy(labels_path(out), label_array)
    return f"{out} (labels: {labels_path(out)})"


def embed(
    run_dir: RunDir,
    out: Annotated[Path, typer.Option(help="Output: codes.npy ([N, d] float32; labels, when the data has them, "
                                           "in codes.labels.npy) or codes.npz (arrays 'codes' and 'labels').")],
    data: Data = None,
    split: Split = "test",
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 500,
    device: Device = "auto",
) -> None:
    """Write the codes model.embed(x) of a split, [N, d] float32: the posterior means (the code of an
    autoencoder) after the latent transforms (sparse AE sigmoid, k-sparse top-k; a k-sparse AE with alpha > 1
    keeps alpha*k units here, k in the code its decoder reads)."""
    from ..apply import embed as embed_run

    _check_options(out, (".npy", ".npz"), batch_size, split)
    codes, labels = embed_run(run_dir, data, split, batch_size, device)
    written = save_arrays(out, "codes", codes, labels)
    typer.echo(f"codes {list(codes.shape)} of the {split} split written to {written}")


def reconstruct(
    run_dir: RunDir,
    out: Annotated[Path, typer.Option(help="Output: recon.npy ([N, *S] float32; labels, when the data has them, "
                                           "in recon.labels.npy) or recon.npz (arrays 'recon' and 'labels').")],
    data: Data = None,
    split: Split = "test",
    png: Annotated[Optional[Path], typer.Option(help="Also write an image grid (.png) of the first 32 samples: "
                                                     "data rows over their reconstructions (image data only).")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per forward pass.")] = 500,
    device: Device = "auto",
) -> None:
    """Write the reconstructions E[x | z = posterior mean] of a split, [N, *S] float32 (the data's shape)."""
    from ..apply import condition_labels, load_split, resolve_run
    from ..checkpoint import check_output
    from ..errors import ConfigError, DataError
    from ..evaluation import map_batches
    from ..viz import as_images, save_pairs

    _check_options(out, (".npy", ".npz"), batch_size, split)
    if png is not None:
        if png.suffix.lower() != ".png":
            raise ConfigError(f"--png must end in .png, got {png.name!r}")
        check_output(png, "--png")
    model = resolve_run(run_dir, device)
    x, labels = load_split(model, data, split)
    if png is not None and as_images(x[:1]) is None:
        raise DataError(f"--png needs image data; samples of shape {list(x.shape[1:])} are not images (nothing written)")
    recon = map_batches(model, model.reconstruct, x, batch_size, c=condition_labels(model, labels)).float()
    if png is not None:  # first: the arrays are not written if the picture cannot be
        save_pairs(x, recon, png)
    written = save_arrays(out, "recon", recon, labels)
    typer.echo(f"reconstructions {list(recon.shape)} of the {split} split written to {written}")
    if png is not None:
        typer.echo(f"data over reconstructions written to {png}")


def score(
    run_dir: RunDir,
    out: Annotated[Path, typer.Option(help="Output CSV: index (in the split), label (when the data has labels) "
                                           "and one column per score.")],
    data: Data = None,
    split: Split = "test",
    normal_class: Annotated[Optional[int], typer.Option(
        help="With labelled data: print the ROC AUC of each score at telling the other classes (anomalies) from this one.")] = None,
    nll_samples: Annotated[int, typer.Option("--nll-samples", "-k", help="Importance samples K of the NLL score (0: skip it).")] = 100,
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the Monte-Carlo scores (−ELBO, NLL).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    device: Device = "auto",
) -> None:
    """Write per-sample anomaly scores (higher = more anomalous) as CSV: recon_error, the squared error summed
    over the data dimensions (data units², every model), and for a VAE whose likelihood is a density,
    neg_elbo (−ELBO, nats) and nll (importance-sampled −log p(x), nats; their inputs are binarized as the
    run binarizes, like 'vaekit eval').
    """
    from ..apply import SCORE_UNITS, anomaly_auc, anomaly_scores, check_normal_class, condition_labels, load_split, resolve_run
    from ..errors import ConfigError

    _check_options(out, (".csv",), batch_size, split)
    if nll_samples < 0:
        raise ConfigError(f"--nll-samples must be >= 0 (0 skips the NLL), got {nll_samples}")
    model = resolve_run(run_dir, device)
    x, labels = load_split(model, data, split)
    if normal_class is not None:
        check_normal_class(labels, normal_class)
    c = condition_labels(model, labels)
    if as_json:
        scores = anomaly_scores(model, x, nll_samples, batch_size, seed, c=c)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("scoring", total=None)
            scores = anomaly_scores(model, x, nll_samples, batch_size, seed, progress=lambda n: bar.advance(task, n), c=c)
    _write_csv(out, scores, labels)
    result = {"run_dir": str(run_dir), "out": str(out), "split": split, "n": len(x),
              "mean": {k: float(v.mean()) for k, v in scores.items()}}
    if normal_class is not None:
        result["normal_class"] = normal_class
        result["auc"] = anomaly_auc(scores, labels, normal_class)
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_table(result, SCORE_UNITS)


def _write_csv(out: Path, scores, labels) -> None:
    import csv

    from ..checkpoint import atomic_write

    names = list(scores)
    columns = [scores[k].tolist() for k in names]
    label_list = None if labels is None else labels.tolist()

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", *(["label"] if label_list is not None else []), *names])
            for i, row in enumerate(zip(*columns)):
                w.writerow([i, *([label_list[i]] if label_list is not None else []), *row])

    atomic_write(out, write)


def _print_table(result: dict, units: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    auc = result.get("auc")
    title = f"vaekit score {result['run_dir']}: {result['n']} samples of the {result['split']} split"
    table = Table(title=title)
    table.add_column("score")
    table.add_column("mean", justify="right")
    table.add_column("unit")
    if auc is not None:
        table.add_column(f"ROC AUC (normal class {result['normal_class']})", justify="right")
    for name, mean in result["mean"].items():
        row = [name, f"{mean:.4f}", units.get(name, "")]
        if auc is not None:
            row.append("n/a (NaN/inf scores)" if auc[name] is None else f"{auc[name]:.4f}")
        table.add_row(*row)
    Console().print(table)
    typer.echo(f"scores written to {result['out']}")
