"""Benchmark: the literature's NLL protocol (Burda et al. 2015) — K = 5000 importance samples on every test digit.

Trains (or reuses, with --out) the README's conv VAE (latent 16) and the MLP VAE 784-400-20 (Bernoulli)
on the bundled MNIST digits (4,000 train / 1,000 test) for --epochs epochs, each in a child process,
then times `vaekit eval`'s estimator (`vaekit.evaluation.evaluate_run`) on all 1,000 test digits and
prints, for each model and each K in --k, the NLL with its two standard errors (over test points, and
Monte-Carlo), the seconds, the decoder rows per second (N·K / seconds) and the peak RSS of the
evaluation (this process's VmHWM from /proc/self/status, reset before each evaluation where the
kernel allows it).  It imports whichever vaekit is on the path, so `PYTHONPATH=OLD_CHECKOUT` times an
older estimator on the same runs (--compile and --memory-budget-mib need the new one).

    python bench/bench_nll.py [--models conv,mlp] [--epochs 5] [--k 5000] [--threads 2] [--out DIR]
    python bench/bench_nll.py --run RUN_DIR --k 100,5000
    python bench/bench_nll.py --out DIR --baseline OLD_CHECKOUT/vaekit/evaluation.py   # old vs new, interleaved
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    "conv": {"encoder": "conv", "prior": "gaussian"},  # the README's main job: latent 16, Bernoulli
    "mlp": {"encoder": "mlp:hidden=400", "decoder": "mlp:hidden=400", "latent_dim": 20, "likelihood": "bernoulli"},
}
"""The benchmarked configurations, as ``vaekit.train`` keywords."""


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM of /proc/self/status), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (``5`` to /proc/self/clear_refs, Linux ≥ 4.0); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train(name: str, epochs: int, out: Path) -> None:
    """Train ``MODELS[name]`` into ``out`` in a child process (its memory is not this process's)."""
    code = ("import sys, vaekit; vaekit.train(epochs=int(sys.argv[1]), device='cpu', out=sys.argv[2], quiet=True, "
            f"figures=False, **{MODELS[name]!r})")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(epochs), str(out)], check=True)
    print(f"trained {name} VAE ({MODELS[name]}), {epochs} epochs, in {time.perf_counter() - t0:.0f} s", flush=True)


def interleaved(runs: dict, baseline: str, k: int, digits: int, rounds: int) -> None:
    """Old (``baseline``, another checkout's ``vaekit/evaluation.py``, imported into this vaekit package) against
    this ``importance_sampled_log_likelihood``, alternating on the same model and ``digits`` test digits, ``rounds``
    rounds; prints the median rows/s of each and their ratio."""
    import importlib.util
    import statistics

    import torch

    import vaekit
    from vaekit import evaluation
    from vaekit.apply import load_split
    from vaekit.training import eval_inputs

    spec = importlib.util.spec_from_file_location("vaekit._baseline_evaluation", baseline)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    for name, run in runs.items():
        model = vaekit.load_run(run)
        x = load_split(model, None, "test", None)[0]
        x = eval_inputs(x, model.run_info["config"].get("binarize", "none"))[:digits]
        rates: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(rounds):
            for label, module in (("old", old), ("new", evaluation)):
                torch.manual_seed(r)
                t0 = time.perf_counter()
                module.importance_sampled_log_likelihood(model, x, k)
                rates[label].append(len(x) * k / (time.perf_counter() - t0))
        o, n = (statistics.median(rates[v]) for v in ("old", "new"))
        print(f"{name:>6} K={k} digits={len(x)} rounds={rounds}: old {o:,.0f} rows/s, new {n:,.0f} rows/s, "
              f"new/old {n / o:.2f}  (old {', '.join(f'{v:,.0f}' for v in rates['old'])}; "
              f"new {', '.join(f'{v:,.0f}' for v in rates['new'])})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="an existing run directory (default: train --models)")
    ap.add_argument("--models", default="conv,mlp", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--epochs", type=int, default=5, help="training epochs (timing needs few)")
    ap.add_argument("--out", default=None, help="keep the trained runs in DIR/<model>; reused when present")
    ap.add_argument("--k", default="5000", help="comma-separated numbers of importance samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder (new estimator only)")
    ap.add_argument("--memory-budget-mib", type=float, default=None, help="chunk budget, MiB (new estimator only)")
    ap.add_argument("--baseline", default=None,
                    help="an older checkout's vaekit/evaluation.py: time it against this one, interleaved, instead")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --baseline")
    ap.add_argument("--digits", type=int, default=200, help="test digits of --baseline's rounds")
    args = ap.parse_args()

    import torch

    import vaekit
    from vaekit.evaluation import evaluate_run

    torch.set_num_threads(args.threads)
    options = {}
    if args.compile:
        options["compile"] = True
    if args.memory_budget_mib is not None:
        options["memory_budget"] = int(args.memory_budget_mib * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        runs = {"run": Path(args.run)} if args.run else {name: root / name for name in args.models.split(",")}
        for name, run in runs.items():
            if not (run / "model.safetensors").is_file():
                train(name, args.epochs, run)
        print(f"vaekit from {Path(vaekit.__file__).parent}, torch {torch.__version__}, {args.threads} threads, "
              f"options {options or 'default'}")
        if args.baseline:
            for k in (int(v) for v in args.k.split(",")):
                interleaved(runs, args.baseline, k, args.digits, args.rounds)
            return
        print(f"{'model':>6} {'K':>6} {'test NLL':>10} {'± se (points)':>14} {'± se (MC)':>10} {'seconds':>8} "
              f"{'rows/s':>8} {'peak RSS MiB':>13}")
        for name, run in runs.items():
            for k in (int(v) for v in args.k.split(",")):
                reset_peak_rss()
                t0 = time.perf_counter()
                out = evaluate_run(run, "test", nll_samples=k, device="cpu", **options)
                dt = time.perf_counter() - t0  # with the ELBO and the reconstruction error: a few percent
                print(f"{name:>6} {k:>6} {out['nll']:>10.2f} {out['nll_se']:>14.2f} {out['nll_mc_se']:>10.3f} "
                      f"{dt:>8.1f} {out['n'] * k / dt:>8,.0f} {peak_rss_mib():>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
