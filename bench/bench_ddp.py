"""Benchmark: training throughput of one process against N processes under torchrun (CPU, gloo).

Model: the classic MLP VAE 784-400-20 (``--model mlp``) or the conv VAE (``--model conv``) on the
4,000/1,000 split of the bundled MNIST digits, Adam 1e-3, global batch 128, dynamic binarization.
Three launches of ``vaekit run``, each in its own process tree, one after the other:

* 1 process, 1 thread;
* 1 process, N threads (the same cores as N processes);
* N processes under ``python -m torch.distributed.run --standalone --nproc_per_node=N``, 1 thread each.

Prints, per launch: the median over the epochs after the first of ``samples_per_s`` (training
steps only, the whole global batch counted) and ``epoch_seconds`` from ``metrics.jsonl``, the wall
time of the launch (imports, rendezvous and evaluation included), the last test ELBO (nats), and
the ratio of each launch's samples/s to the 1-process, 1-thread one.

    python bench/bench_ddp.py [--model mlp|conv] [--nproc 2] [--epochs 4] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "mlp": ["--encoder", "mlp:hidden=400", "--latent-dim", "20"],
    "conv": ["--encoder", "conv", "--latent-dim", "16"],
}


def launch(cmd: list[str], threads: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = records[1:] or records  # the first epoch pays the allocator's and kernels' warm-up
    return {"samples_per_s": statistics.median(r["samples_per_s"] for r in later),
            "epoch_seconds": statistics.median(r["epoch_seconds"] for r in later),
            "wall_s": wall, "test_elbo": records[-1]["test_elbo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.nproc
    run = ["-m", "vaekit", "run", "--data", "mnist", *MODELS[args.model], "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--device", "cpu", "--no-figures", "-q"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, prefix, threads in [
            ("1 process, 1 thread", [sys.executable], 1),
            (f"1 process, {n} threads", [sys.executable], n),
            (f"{n} processes (torchrun), 1 thread each",
             [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"], 1),
        ]:
            out = Path(tmp) / f"run{len(rows)}"
            cmd = prefix + run + ["--out", str(out)]  # torchrun's own flags come before "-m vaekit"
            rows.append((label, launch(cmd, threads, out)))
    base = rows[0][1]["samples_per_s"]
    print(f"{args.model} VAE on MNIST (4,000 train / 1,000 test), global batch {args.batch_size}, {args.epochs} epochs; "
          "medians over epochs 2..")
    print(f"{'':42s} {'samples/s':>10s} {'epoch s':>8s} {'wall s':>7s} {'test ELBO':>10s} {'vs 1x1':>7s}")
    for label, r in rows:
        print(f"{label:42s} {r['samples_per_s']:10,.0f} {r['epoch_seconds']:8.2f} {r['wall_s']:7.1f} "
              f"{r['test_elbo']:10.2f} {r['samples_per_s'] / base:6.2f}x")


if __name__ == "__main__":
    main()
