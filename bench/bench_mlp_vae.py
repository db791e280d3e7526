"""Benchmark: vaekit's pipeline against a plain PyTorch loop with a DataLoader, same model and data.

Model: the classic MLP VAE 784-400-20 (ReLU, Bernoulli likelihood from logits), Adam 1e-3,
batch 128, 10 epochs, 2 threads, on the 4,000/1,000 split of the bundled MNIST digits with
dynamic binarization of the training set (the test set binarized once, as in vaekit).
Each side runs in its own process so peak RSS is its own.

Prints, for each side: training samples/s (training steps only), peak RSS (MiB) of the whole
process and at the end of training, test ELBO and test NLL by importance sampling (K = 1000,
all 1,000 test digits), in nats.

    python bench/bench_mlp_vae.py [--epochs 10] [--nll-samples 1000] [--threads 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_vaekit(args) -> dict:
    import torch

    import vaekit
    from vaekit.evaluation import elbo_terms, iwae_log_likelihood

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = vaekit.train(
            data="mnist", encoder="mlp:hidden=400", decoder="mlp:hidden=400", prior="gaussian",
            likelihood="bernoulli", binarize="dynamic", latent_dim=20, batch_size=128, lr=1e-3,
            epochs=args.epochs, seed=args.seed, device="cpu", out=f"{tmp}/run", quiet=True, figures=False,
        )
        train_rss = peak_rss_mib()
        train_seconds = sum(m["epoch_seconds"] for m in result.history)
        n_train = result.history[0]["samples_per_s"] * result.history[0]["epoch_seconds"]
        from vaekit.data import binarize, load_mnist5k
        from vaekit.training import TEST_BINARIZE_SEED

        test = binarize(load_mnist5k().test_x, torch.Generator().manual_seed(TEST_BINARIZE_SEED))
        torch.manual_seed(args.seed)
        elbo = float(elbo_terms(result.model, test)["elbo"].mean())
        nll = float(-iwae_log_likelihood(result.model, test, args.nll_samples).mean())
    return {"samples_per_s": n_train * args.epochs / train_seconds, "elbo": elbo, "nll": nll,
            "train_rss_mib": train_rss, "peak_rss_mib": peak_rss_mib()}


def run_plain(args) -> dict:
    """A hand-written loop in the style of the PyTorch VAE example, with a DataLoader."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from vaekit.data import binarize, load_mnist5k
    from vaekit.training import TEST_BINARIZE_SEED

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_mnist5k()
    train = data.train_x.view(-1, 784)
    test = binarize(data.test_x, torch.Generator().manual_seed(TEST_BINARIZE_SEED)).view(-1, 784)

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc21, self.fc22 = nn.Linear(784, 400), nn.Linear(400, 20), nn.Linear(400, 20)
            self.fc3, self.fc4 = nn.Linear(20, 400), nn.Linear(400, 784)

        def encode(self, x):
            h = F.relu(self.fc1(x))
            return self.fc21(h), self.fc22(h)

        def decode(self, z):
            return self.fc4(F.relu(self.fc3(z)))  # logits

    model = VAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(train), batch_size=128, shuffle=True)
    seconds, seen = 0.0, 0
    for _ in range(args.epochs):
        start = time.perf_counter()
        for (x,) in loader:
            x = torch.bernoulli(x)
            mu, logvar = model.encode(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            rec = F.binary_cross_entropy_with_logits(model.decode(z), x, reduction="sum")
            kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
            loss = (rec + kl) / x.shape[0]
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += x.shape[0]
        seconds += time.perf_counter() - start
    train_rss = peak_rss_mib()

    @torch.no_grad()
    def log_weights(x, k):
        mu, logvar = model.encode(x)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn((k,) + mu.shape)
        log_q = (-0.5 * ((z - mu) / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        logits = model.decode(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        return log_px + log_p - log_q  # [k, B]

    torch.manual_seed(args.seed)
    elbo = float(torch.cat([log_weights(test[i:i + 100], 1)[0] for i in range(0, 1000, 100)]).mean())
    lls = []
    for i in range(0, len(test), 10):
        lw = torch.cat([log_weights(test[i:i + 10], 100) for _ in range(args.nll_samples // 100)])
        lls.append(torch.logsumexp(lw, 0) - math.log(lw.shape[0]))
    return {"samples_per_s": seen / seconds, "elbo": elbo, "nll": float(-torch.cat(lls).mean()),
            "train_rss_mib": train_rss, "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--nll-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=["vaekit", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_vaekit(args) if args.side == "vaekit" else run_plain(args)))
        return
    if args.nll_samples % 100:
        parser.error("--nll-samples must be a multiple of 100")
    rows = {}
    for side in ("plain", "vaekit"):
        cmd = [sys.executable, __file__, "--side", side, "--epochs", str(args.epochs), "--nll-samples",
               str(args.nll_samples), "--threads", str(args.threads), "--seed", str(args.seed)]
        rows[side] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(f"MLP VAE 784-400-20, {args.epochs} epochs, batch 128, {args.threads} threads, "
          f"4,000 train / 1,000 test MNIST digits, NLL with K={args.nll_samples}")
    print(f"{'':22s}{'samples/s':>12s}{'peak RSS MiB':>14s}{'(training)':>12s}{'test ELBO':>12s}{'test NLL':>11s}")
    labels = {"plain": "plain PyTorch loop", "vaekit": "vaekit run"}
    for side, r in rows.items():
        print(f"{labels[side]:22s}{r['samples_per_s']:12,.0f}{r['peak_rss_mib']:14.0f}{r['train_rss_mib']:12.0f}"
              f"{r['elbo']:12.2f}{r['nll']:11.2f}")
    ratio = rows["vaekit"]["samples_per_s"] / rows["plain"]["samples_per_s"]
    print(f"vaekit / plain throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
