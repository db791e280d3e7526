"""Benchmark: per-batch latency of encode and decode, in Python eager, Python TorchScript, the C++
runtime (TorchScript archive), and the AOTInductor package (Python loader and C++ runtime).

Trains (or takes) a run, exports it both ways, builds cpp_runtime with CMake, and prints the
median latency in µs at batch 1 and 256, with the number of threads fixed (default 2).

    python bench/bench_export.py [--run RUN_DIR] [--threads 2] [--iters 200] [--build-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def median_us(fn, arg, iters: int) -> float:
    with torch.no_grad():
        for _ in range(5):
            fn(arg)
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn(arg)
            times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def build_runtime(build: Path) -> Path:
    prefix = torch.utils.cmake_prefix_path
    subprocess.run(["cmake", "-S", str(ROOT / "cpp_runtime"), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True, capture_output=True)
    return build / "vaekit-bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run directory (default: train the default conv VAE for 2 epochs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--build-dir", help="reuse a cpp_runtime build directory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import vaekit
    from vaekit.export import export_aoti, export_torchscript

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(args.run) if args.run else vaekit.train(epochs=2, out=str(tmp / "run"), quiet=True).run_dir
        model = vaekit.load_run(run)
        ts, pt2 = export_torchscript(model, tmp / "model.pt"), export_aoti(model, tmp / "model.pt2")
        bench = build_runtime(Path(args.build_dir) if args.build_dir else tmp / "build")
        ts_module, aoti = vaekit.load_exported(ts), vaekit.load_exported(pt2, trust=True)  # built just above
        name = f"{model.config.encoder.name}/{model.config.prior.name}, latent {model.latent_dim}"
        print(f"encode/decode latency, median µs, {args.threads} threads — {name}")
        print(f"{'':28s}{'encode b=1':>12s}{'decode b=1':>12s}{'encode b=256':>14s}{'decode b=256':>14s}")
        rows = {}
        for batch in (1, 256):
            x = torch.rand([batch] + list(model.data_shape))
            z = torch.randn(batch, model.latent_dim)
            for label, enc, dec in (("Python eager", model.encode, model.decode_mean),
                                    ("Python TorchScript", ts_module.encode, ts_module.decode),
                                    ("Python AOTI package", aoti.encode, aoti.decode)):
                rows.setdefault(label, []).extend([median_us(enc, x, args.iters), median_us(dec, z, args.iters)])
            for label, path in (("C++ runtime, TorchScript", ts), ("C++ runtime, AOTI package", pt2)):
                # the .pt2 package was compiled here, just now: trusting its native code is safe
                out = subprocess.run([str(bench), str(path), "--batch", str(batch), "--iters", str(args.iters),
                                      "--trust-native-code"],
                                     check=True, capture_output=True, text=True,
                                     env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
                result = json.loads(out.stdout)
                rows.setdefault(label, []).extend([result["encode_us"], result["decode_us"]])
        for label, values in rows.items():
            print(f"{label:28s}" + "".join(f"{v:12.1f}" if i < 2 else f"{v:14.1f}" for i, v in enumerate(values)))


if __name__ == "__main__":
    sys.exit(main())
