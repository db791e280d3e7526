"""Benchmark: the NLL of IWAE-trained against ELBO-trained VAEs (Burda et al. 2015, table 1), same model,
data, epochs and seed.

Model: MLP VAE 784-400-20 (ReLU, Bernoulli likelihood from logits), Adam 1e-3, batch 128, on the
4,000/1,000 split of the bundled MNIST digits, dynamic binarization (test set binarized once, as in
vaekit).  Each objective (``--objectives``, default ``elbo`` and ``iwae:k=5``) is trained with each
seed; the test NLL is the importance-sampled estimate (``vaekit.evaluation.iwae_log_likelihood``,
K = ``--nll-samples``, all 1,000 test digits, its noise seeded), in nats, with its standard error over
the test digits.

    python bench/bench_objectives.py [--epochs 20] [--seeds 0,1,2] [--nll-samples 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--objectives", default="elbo;iwae:k=5", help="';'-separated objective specs")
    ap.add_argument("--nll-samples", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", default="mnist")
    args = ap.parse_args()

    import torch

    import vaekit
    from vaekit.evaluation import elbo_terms, iwae_log_likelihood
    from vaekit.training import eval_inputs

    torch.set_num_threads(args.threads)
    objectives = args.objectives.split(";")
    seeds = [int(s) for s in args.seeds.split(",")]
    x = eval_inputs(vaekit.load_data(args.data).test_x, "dynamic")
    print(f"MLP VAE -400-20 on {args.data} ({len(x)} test digits), {args.epochs} epochs, batch 128, "
          f"{args.threads} thread(s), NLL with K={args.nll_samples}; nats")
    print(f"{'objective':<28} {'seed':>4} {'train s':>8} {'test ELBO':>10} {'test NLL':>9} {'± s.e.':>7}")
    nll: dict[str, list[float]] = {o: [] for o in objectives}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for objective in objectives:
                start = time.perf_counter()
                run = vaekit.train(data=args.data, encoder="mlp:hidden=400", latent_dim=20, epochs=args.epochs,
                                   batch_size=128, seed=seed, objective=objective, device="cpu",
                                   out=f"{tmp}/{seed}-{len(nll[objective])}-{objective}", quiet=True, figures=False)
                seconds = time.perf_counter() - start
                elbo = float(elbo_terms(run.model, x, seed=0)["elbo"].mean())
                torch.manual_seed(1234)
                ll = iwae_log_likelihood(run.model, x, args.nll_samples)
                value, se = float(-ll.mean()), float(ll.std() / len(ll) ** 0.5)
                nll[objective].append(value)
                print(f"{objective:<28} {seed:>4} {seconds:>8.1f} {elbo:>10.2f} {value:>9.2f} {se:>7.2f}", flush=True)
    base = objectives[0]
    for objective in objectives[1:]:
        gaps = [b - o for b, o in zip(nll[base], nll[objective])]
        print(f"NLL({base}) − NLL({objective}) per seed: " + ", ".join(f"{g:.2f}" for g in gaps)
              + f"; mean {sum(gaps) / len(gaps):.2f} nats")


if __name__ == "__main__":
    main()
