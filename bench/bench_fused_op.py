"""Benchmark: the fused reparameterize + KL op against the eager formula.

Forward + backward time (µs, best of 9 alternating repeats) at (B, d) = (256, 2), (256, 32), (256, 256),
(4096, 32), (4096, 256), float32, on the CPU with 1 and 2 threads (and on CUDA when present),
then one end-to-end comparison: the time of a whole training step of the MLP VAE 784-400-20 on a
batch of real MNIST digits with the op on and off.

    python bench/bench_fused_op.py [--repeats 9] [--skip-training]
"""

from __future__ import annotations

import argparse
import time

import torch

from vaekit.ops import cpu_kernel, reparameterize_kl
from vaekit.ops.reference import gaussian_kl

SHAPES = [(256, 2), (256, 32), (256, 256), (4096, 32), (4096, 256)]


def eager(mu, logvar, eps):
    """The unfused formula as usually written: five or six elementwise kernels and a sum."""
    std = torch.exp(0.5 * logvar)
    return mu + std * eps, gaussian_kl(mu, logvar)


def compare_us(b: int, d: int, device: str, repeats: int) -> tuple[float, float]:
    """Best µs per forward+backward of the eager formula and of the fused op, measured alternately
    (eager, fused, eager, fused, …) so that the machine's drifts hit both alike."""
    g = torch.Generator(device=device).manual_seed(0)
    mu = torch.randn(b, d, device=device, generator=g).requires_grad_()
    logvar = torch.randn(b, d, device=device, generator=g).requires_grad_()
    eps = torch.randn(b, d, device=device, generator=g)
    gz, gk = torch.randn(b, d, device=device, generator=g), torch.randn(b, device=device, generator=g)
    n = max(20, min(1000, int(1e7 / (b * d))))

    def run(fn, k: int) -> float:
        start = time.perf_counter()
        for _ in range(k):
            z, kl = fn(mu, logvar, eps)
            torch.autograd.backward((z, kl), (gz, gk))
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / k * 1e6

    run(eager, 20), run(reparameterize_kl, 20)
    best = {eager: float("inf"), reparameterize_kl: float("inf")}
    for _ in range(repeats):
        for fn in best:
            best[fn] = min(best[fn], run(fn, n))
    return best[eager], best[reparameterize_kl]


def training_step_us(rounds: int = 40, steps: int = 20) -> dict[bool, float]:
    """Median µs of one training step (forward, loss, backward, Adam) of the MLP VAE 784-400-20 on a
    batch of 128 real digits, with the fused op on and off, interleaved so drifts hit both alike."""
    import statistics

    from vaekit.config import RunConfig
    from vaekit.data import load_mnist5k
    from vaekit.manager import get_plugin_manager
    from vaekit.model import build_model

    x = torch.bernoulli(load_mnist5k().train_x[:128], generator=torch.Generator().manual_seed(0))
    setups = {}
    for fused in (True, False):
        torch.manual_seed(0)
        config = RunConfig(encoder="mlp:hidden=400", latent_dim=20, prior=f"gaussian:fused={str(fused).lower()}")
        model = build_model(config, (1, 28, 28), get_plugin_manager())
        setups[fused] = (model, torch.optim.Adam(model.parameters(), lr=1e-3))

    def step(fused: bool) -> None:
        model, opt = setups[fused]
        loss, _ = model.loss(model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()

    times: dict[bool, list[float]] = {True: [], False: []}
    for fused in (True, False):
        for _ in range(30):
            step(fused)
    for _ in range(rounds):
        for fused in (True, False):
            start = time.perf_counter()
            for _ in range(steps):
                step(fused)
            times[fused].append((time.perf_counter() - start) / steps * 1e6)
    return {fused: statistics.median(t) for fused, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    reparameterize_kl(torch.zeros(1, 1), torch.zeros(1, 1))  # build/load the CPU kernel first
    print(f"CPU implementation: {cpu_kernel.status()}; torch {torch.__version__}")
    print(f"{'device':8s}{'threads':>8s}{'B':>6s}{'d':>5s}{'eager µs':>11s}{'fused µs':>11s}{'speed-up':>10s}")
    configs = [("cpu", 1), ("cpu", 2)] + ([("cuda", 0)] if torch.cuda.is_available() else [])
    for device, threads in configs:
        if threads:
            torch.set_num_threads(threads)
        for b, d in SHAPES:
            e, f = compare_us(b, d, device, args.repeats)
            print(f"{device:8s}{threads or '-':>8}{b:6d}{d:5d}{e:11.1f}{f:11.1f}{e / f:9.2f}x")
    if not args.skip_training:
        torch.set_num_threads(2)
        us = training_step_us()
        print(f"training step, MLP VAE 784-400-20, batch 128, 2 threads (median of 40 interleaved rounds): "
              f"fused {us[True]:,.0f} µs, eager {us[False]:,.0f} µs ({us[False] / us[True]:.2f}x)")


if __name__ == "__main__":
    main()
