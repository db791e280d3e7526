"""Benchmark: how label-true a conditional VAE's samples are (Sohn et al. 2015) on the bundled MNIST digits.

Trains ``vaekit run --condition label`` (MLP 784-512-512, d = 16, Bernoulli, dynamic binarization) on the
4,000/1,000 split of the bundled MNIST digits with 1 thread, then classifies 500 samples per label with a
logistic regression (scikit-learn) trained on the real training digits and prints the share classified as
the label they were generated for, per label and overall, next to the classifier's accuracy on the real
test digits.

    python bench/bench_cvae.py [--epochs 20] [--encoder mlp:hidden=512,512] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vaekit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--encoder", default="mlp:hidden=512,512")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-label", type=int, default=500)
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from sklearn.linear_model import LogisticRegression

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or str(Path(tmp) / "cvae")
        start = time.perf_counter()
        result = vaekit.train(data="mnist", encoder=args.encoder, latent_dim=args.latent_dim, epochs=args.epochs,
                              seed=args.seed, condition="label", out=out, quiet=True, figures=False)
        seconds = time.perf_counter() - start
        model = vaekit.load_run(result.run_dir)
        data = vaekit.load_data("mnist")
        clf = LogisticRegression(max_iter=1000).fit(data.train_x.flatten(1).numpy(), data.train_y.numpy())
        real = clf.score(data.test_x.flatten(1).numpy(), data.test_y.numpy())
        acc = []
        with torch.no_grad():
            for k in range(model.num_classes):
                x = model.sample(args.per_label, torch.Generator().manual_seed(args.seed), label=k)
                acc.append(float((clf.predict(x.flatten(1).numpy()) == k).mean()))
    print(f"CVAE {args.encoder}, d={args.latent_dim}, {args.epochs} epochs, seed {args.seed}, 1 thread, "
          f"4,000 train / 1,000 test MNIST digits; training {seconds:.0f} s, test ELBO {result.metrics['test_elbo']:.2f} nats")
    print(f"logistic regression on the real training digits: {real:.3f} accuracy on the real test digits")
    print(f"samples classified as their label ({args.per_label} per label):")
    print("label    " + "  ".join(f"{k:>5d}" for k in range(len(acc))) + "    all")
    print("accuracy " + "  ".join(f"{a:5.3f}" for a in acc) + f"  {np.mean(acc):5.3f}")


if __name__ == "__main__":
    main()
