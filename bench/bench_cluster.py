"""Benchmark: deep clustering (plugins/vaekit-cluster) on the bundled MNIST digits — k-means vs DEC vs DCN.

Pretrains a conv variational autoencoder (``--prior gaussian --latent-dim 10``, a Gaussian likelihood
with fixed σ = 0.1 — squared error — on the grey levels, ``--binarize none``; ``--prior none`` gives the
deterministic conv autoencoder instead; the 4,000/1,000 split, 1 thread; an existing ``OUT/ae`` run is
reused), then fine-tunes it with ``--init`` and ``--regularizer dec:k=10,...`` (IDEC: the reconstruction
kept, γ = 4000) and ``--regularizer dcn:k=10,...`` (λ = 1000), and prints ACC (Hungarian matching), NMI
and ARI on the 1,000 test digits of: k-means (the package's ``fit_kmeans``: scikit-learn, n_init = 20,
the run's seed — what DEC and DCN start from) fitted on the pretrained model's training codes (the
posterior means), DEC's and DCN's own assignments of the test codes.  The equivalent CLI commands are
printed first.

    python bench/bench_cluster.py [--prior gaussian] [--pretrain-epochs 60] [--pretrain-regularizer denoising] [--epochs 40] [--dec SPEC] [--dcn SPEC] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import vaekit
from vaekit.manager import get_plugin_manager
from vaekit.training import load_data



def scores(y: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    """ACC (Hungarian matching), NMI and ARI: vaekit-cluster's own metrics (``pip install -e plugins/vaekit-cluster``)."""
    from vaekit_cluster.metrics import clustering_scores

    s = clustering_scores(y, pred)
    return s["acc"], s["nmi"], s["ari"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="gaussian", help="gaussian (a VAE, the default) or none (an autoencoder)")
    parser.add_argument("--pretrain-epochs", type=int, default=60)
    parser.add_argument("--pretrain-regularizer", default=None, help="e.g. denoising (a denoising AE, as DEC pretrains)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dec", default="dec:k=10,recon=true,weight=4000,update_interval=30")
    parser.add_argument("--dcn", default="dcn:k=10,weight=1000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the three runs (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from vaekit_cluster.dec import nearest
    from vaekit_cluster.metrics import fit_kmeans

    pm = get_plugin_manager()  # vaekit-cluster's dec and dcn through its entry point
    model_args = dict(data="mnist", encoder="conv", decoder="conv", prior=args.prior, likelihood="gaussian:sigma=0.1",
                      binarize="none", latent_dim=10, seed=args.seed)
    flags = (f"--data mnist --encoder conv --decoder conv --prior {args.prior} --likelihood gaussian:sigma=0.1 --binarize none "
             "--latent-dim 10 --seed " + str(args.seed))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        ae, runs = out / "ae", {"DEC": (args.dec, out / "dec"), "DCN": (args.dcn, out / "dcn")}
        pre_reg = [] if args.pretrain_regularizer is None else [args.pretrain_regularizer]
        pre_flag = "".join(f" --regularizer {r}" for r in pre_reg)
        print(f"vaekit run {flags}{pre_flag} --epochs {args.pretrain_epochs} --out {ae}")
        for spec, run in runs.values():
            print(f"vaekit run {flags} --init {ae} --regularizer {spec} --epochs {args.epochs} --out {run}")
        start = time.perf_counter()
        if not (ae / "model.safetensors").exists():
            vaekit.train(**model_args, regularizers=pre_reg, epochs=args.pretrain_epochs, out=str(ae), pm=pm,
                         quiet=True, figures=False)
        data = load_data("mnist", pm)
        y = data.test_y.numpy()
        with torch.no_grad():
            pre = vaekit.load_run(ae, pm=pm)
            centres, _ = fit_kmeans(pre.embed(data.train_x), 10, args.seed)
            pred = nearest(pre.embed(data.test_x), centres).numpy()  # the nearest k-means centre
            rows = {"k-means on the pretrained codes": scores(y, pred)}
        for name, (spec, run) in runs.items():
            result = vaekit.train(**model_args, init=str(ae), regularizers=[spec], epochs=args.epochs, out=str(run),
                                  pm=pm, quiet=True, figures=False)
            model = result.model.eval()
            with torch.no_grad():
                pred = model.regularizers[0].assign(model.embed(data.test_x)).numpy()
            stopped = result.history[-1].get("stopped")
            label = f"{name} ({spec}, {len(result.history)} epochs{', stopped early' if stopped else ''})"
            rows[label] = scores(y, pred)
        seconds = time.perf_counter() - start
    print(f"\nconv {'VAE' if args.prior != 'none' else 'AE'} d=10 on the bundled MNIST digits (4,000 train / 1,000 test), seed {args.seed}, 1 thread, "
          f"{seconds:.0f} s")
    print(f"{'':72s} {'ACC':>6s} {'NMI':>6s} {'ARI':>6s}")
    for label, (acc, nmi, ari) in rows.items():
        print(f"{label:72s} {acc:6.3f} {nmi:6.3f} {ari:6.3f}")


if __name__ == "__main__":
    main()
