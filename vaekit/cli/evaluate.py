"""``vaekit eval``: test-set ELBO, importance-sampled NLL and reconstruction error of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate_run)


_LABELS = {
    "elbo": ("test ELBO", "nats"),
    "log_px": ("log p(x|z)", "nats"),
    "kl": ("KL(q(z|x) ‖ p(z))", "nats"),
    "nll": ("NLL (importance-sampled)", "nats"),
    "nll_se": ("  standard error over test points", "nats"),
    "nll_mc_se": ("  Monte-Carlo standard error", "nats"),
    "loss_recon": ("reconstruction loss (not a density: no ELBO or NLL)", "loss units"),
    "recon_mse": ("reconstruction MSE", "per pixel"),
    "n": ("test samples", ""),
    "nll_samples": ("importance samples K", ""),
    "nll_seconds": ("  NLL time", "s"),
    "nll_rows_per_s": ("  decoder rows per second (N·K / time)", "rows/s"),
}


_CONDITIONAL_LABELS = {
    "elbo": ("test ELBO of log p(x|c)", "nats"),
    "log_px": ("log p(x|z, c)", "nats"),
    "kl": ("KL(q(z|x, c) ‖ p(z))", "nats"),
    "nll": ("NLL −log p(x|c) (importance-sampled)", "nats"),
}
"""A conditional VAE's rows: its bounds are on log p(x|c), not comparable with an unconditional NLL."""


def evaluate_run(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by 'vaekit run'.")],
    nll_samples: Annotated[int, typer.Option("--nll-samples", "-k", help="Importance samples K per test point (0: skip the NLL).")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Test points per batch.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the Monte-Carlo estimates (0, the default, gives the ELBO training logged as test_elbo).")] = 0,
    memory_budget_mib: Annotated[Optional[float], typer.Option("--memory-budget-mib", help="Memory of one importance-sampling chunk, MiB (default: 24 on the CPU, 1024 on a GPU).")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the decoder and likelihood of the NLL (seconds of compilation; pays for long runs such as -k 5000 of a conv decoder).")] = False,
) -> None:
    """Evaluate a trained run on its test split (ELBO, NLL by importance sampling, reconstruction error).

    The ELBO is :func:`vaekit.evaluation.evaluate`'s seeded estimate; with the default ``--seed 0``
    (``EVAL_SEED``) it equals the last ``test_elbo`` in the run's ``metrics.jsonl`` (same device).
    """
    from ..checkpoint import read_run_config
    from ..config import check_seed
    from ..errors import ConfigError
    from ..evaluation import evaluate_run

    if nll_samples < 0:
        raise ConfigError(f"--nll-samples must be >= 0 (0 skips the NLL), got {nll_samples}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if memory_budget_mib is not None and not 1 <= memory_budget_mib * 2**20 < float("inf"):
        raise ConfigError(f"--memory-budget-mib must be positive (MiB of one chunk), got {memory_budget_mib}")
    check_seed(seed)
    info = read_run_config(run_dir)
    nll_options = {"memory_budget": None if memory_budget_mib is None else int(memory_budget_mib * 2**20),
                   "compile": compile}
    if as_json:
        result = evaluate_run(run_dir, "test", nll_samples, batch_size, device, seed, **nll_options)
    else:
        from rich.progress import MofNCompleteColumn, Progress

        total = info.get("data", {}).get("n_test")  # test points: the bar's unit
        with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), transient=True) as bar:
            task = bar.add_task(f"importance sampling, K = {nll_samples}",
                                total=total if isinstance(total, int) and nll_samples > 0 else None)
            result = evaluate_run(run_dir, "test", nll_samples, batch_size, device, seed,
                                  progress=lambda n: bar.advance(task, n), **nll_options)
    result = {"run_dir": str(run_dir), **result}
    if as_json:
        typer.echo(json.dumps(result))
        return
    from rich.console import Console
    from rich.table import Table

    conditional = info.get("config", {}).get("condition", "none") == "label"
    labels = _CONDITIONAL_LABELS if conditional else {}
    table = Table(title=f"vaekit eval {run_dir}" + (" (conditional VAE: bounds on log p(x|c))" if conditional else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for key, value in result.items():
        if key == "run_dir":
            continue
        label, unit = labels.get(key) or _LABELS.get(key, (key, ""))
        text = f"{value:,.0f}" if key == "nll_rows_per_s" else f"{value:.4f}" if isinstance(value, float) else str(value)
        table.add_row(label, text, unit)
    Console().print(table)
