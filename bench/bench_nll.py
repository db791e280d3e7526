"""Benchmark: the literature's NLL protocol (Burda et al. 2015) — K = 5000 importance samples on every test digit.

Trains a model on the bundled MNIST digits (4,000 train / 1,000 test; default: the README's conv VAE,
latent 16, for --epochs epochs) or takes an existing run (--run DIR), then times `vaekit eval`'s
estimator on all 1,000 test digits and prints the NLL with its two standard errors (over test points,
and Monte-Carlo), the decoder rows per second and the peak RSS, for each K in --k.

    python bench/bench_nll.py [--run DIR | --encoder conv --epochs 30] [--k 100,5000] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an existing run directory (default: train one)")
    ap.add_argument("--encoder", default="conv")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--k", default="100,5000", help="comma-separated numbers of importance samples")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    import vaekit
    from vaekit.evaluation import evaluate_run

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            t0 = time.perf_counter()
            run = vaekit.train(encoder=args.encoder, epochs=args.epochs, device="cpu", out=f"{tmp}/run",
                               quiet=True, figures=False).run_dir
            print(f"trained {args.encoder} VAE, {args.epochs} epochs, in {time.perf_counter() - t0:.0f} s")
        print(f"{'K':>6} {'test NLL':>10} {'± se (points)':>14} {'± se (MC)':>10} {'seconds':>8} {'rows/s':>8} {'peak RSS MiB':>13}")
        for k in (int(v) for v in args.k.split(",")):
            t0 = time.perf_counter()
            out = evaluate_run(run, "test", nll_samples=k, device="cpu")
            dt = time.perf_counter() - t0
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"{k:>6} {out['nll']:>10.2f} {out['nll_se']:>14.2f} {out['nll_mc_se']:>10.3f} {dt:>8.0f} "
                  f"{out['n'] * k / dt:>8,.0f} {rss:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
