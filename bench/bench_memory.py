"""Benchmark: peak resident memory (RSS) of a training process, for data held in memory and data read from disk.

Each measurement is a fresh child process (its own peak, ``VmHWM``; ``ru_maxrss`` would keep the
forking parent's high-water mark across exec) that trains the default
conv VAE (Bernoulli likelihood, dynamic binarization, batch 128, CPU) for ``--steps`` optimizer steps,
then evaluates the test split and checkpoints:

* ``imported``: python + torch + vaekit imported, nothing loaded (the floor of every row);
* ``60k in memory``: 60,000 synthetic 28x28 uint8 training images + 10,000 test images (an ``.npz``,
  47 MB of training pixels), loaded in memory;
* ``1.5 GB .npy``: 1.9 M synthetic 1x28x28 uint8 images in one ``.npy`` (1.49 GB), read from disk batch
  by batch (``lazy=auto`` picks it: the file exceeds 1 GiB), with the default test split (10 %: 190,000
  images, held as uint8 and binarized as uint8 0/1, all evaluated) and with ``test_fraction=0.001``;
  ``--big-in-memory`` adds the same file with ``lazy=false`` (test split 0.1 %).

The child stops after ``--steps`` batches by wrapping ``Trainer.indexed_batches`` (the same on vaekit
versions without ``--max-steps``), so the script measures any checkout: run it with
``PYTHONPATH=<checkout>`` (the children inherit it).

    PYTHONPATH=$PWD python bench/bench_memory.py [--steps 20] [--threads 1] [--tmp DIR] [--skip-big] [--big-in-memory]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import itertools, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
import vaekit
from vaekit.training import Trainer
print(vaekit.__file__)
if sys.argv[1] != "-":
    steps = int(sys.argv[3])
    batches = Trainer.indexed_batches
    Trainer.indexed_batches = lambda self, *a, **k: itertools.islice(batches(self, *a, **k), steps)
    vaekit.train(data=sys.argv[1], encoder="conv", epochs=1, batch_size=128, device="cpu", out=sys.argv[4],
                 quiet=True, figures=False)
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")))  # KiB
"""


def peak_mb(data: str, args, out: Path) -> tuple[float, float, str]:
    """Peak RSS (MB) and wall seconds of one child training on ``data`` ("-": import only), and the
    checkout it imported vaekit from."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, data, str(args.threads), str(args.steps), str(out)],
                          capture_output=True, text=True, env={**os.environ, "VAEKIT_DISABLE_CPP_KERNEL": "1"},
                          cwd=out.parent)  # not the checkout's root: PYTHONPATH alone says which vaekit runs
    if proc.returncode:
        raise SystemExit(f"the child failed on {data}:\n{proc.stderr[-2000:]}")
    where, peak = proc.stdout.split()[-2:]
    return int(peak) / 1024, time.perf_counter() - start, str(Path(where).parents[1])


def write_big(path: Path, n: int) -> None:
    """``n`` synthetic 1x28x28 uint8 images in one ``.npy``, written in chunks (never whole in memory)."""
    import numpy as np

    header = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 1, 28, 28))
    offset = header.offset
    del header
    block = np.random.default_rng(0).integers(0, 256, size=(8192, 1, 28, 28), dtype=np.uint8)
    with open(path, "r+b") as f:
        f.seek(offset)
        for i in range(0, n, len(block)):
            f.write(np.roll(block, i // len(block), axis=0)[:min(len(block), n - i)].tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--big-samples", type=int, default=1_900_000)
    ap.add_argument("--tmp", default=None, help="folder for the data files (default: a temporary folder)")
    ap.add_argument("--skip-big", action="store_true", help="skip the 1.5 GB file")
    ap.add_argument("--big-in-memory", action="store_true", help="also load the 1.5 GB file in memory (lazy=false)")
    args = ap.parse_args()

    import numpy as np

    print(f"peak RSS of a conv VAE run, {args.steps} steps of batch 128 + test evaluation, {args.threads} thread(s)")
    print(f"{'data':<40} {'peak RSS MB':>12} {'wall s':>7}  vaekit from")
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        small = tmp / "mnist_like.npz"
        np.savez(small, x_train=rng.integers(0, 256, size=(60_000, 28, 28), dtype=np.uint8),
                 x_test=rng.integers(0, 256, size=(10_000, 28, 28), dtype=np.uint8))
        rows = [("imported", "-"), ("60k 28x28 uint8 in memory", str(small))]
        if not args.skip_big:
            big = tmp / "big.npy"
            write_big(big, args.big_samples)
            gb = big.stat().st_size / 1e9
            rows.append((f"{gb:.2f} GB .npy (lazy=auto, test 10 %)", f"file:path={big}"))
            rows.append((f"{gb:.2f} GB .npy (lazy=auto, test 0.1 %)", f"file:path={big},test_fraction=0.001"))
            if args.big_in_memory:
                rows.append((f"{gb:.2f} GB .npy (lazy=false, test 0.1 %)", f"file:path={big},test_fraction=0.001,lazy=false"))
        for i, (label, data) in enumerate(rows):
            mb, seconds, where = peak_mb(data, args, tmp / f"run{i}")
            print(f"{label:<40} {mb:>12,.0f} {seconds:>7.1f}  {where}", flush=True)


if __name__ == "__main__":
    main()
