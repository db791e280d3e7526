"""Benchmark: the sparse-input linear layer (``vaekit::sparse_input_linear``) against torch's dense ``F.linear``.

Forward + backward (gradients of W and b; the input needs none, as a first layer's) in ms, best of
alternating repeats, on the CPU at 2 threads, for the MLP encoder's first layer 784→400 (and 784→1000):

* a batch of 128 real MNIST digits, dynamically binarized (13–18 % ones), and the same digits in gray levels;
* uniformly random 0/1 inputs with 5–50 % ones (where the op switches to the dense product: ``MAX_DENSITY``).

The weight is row-major, as ``layers.SparseInputLinear`` keeps it (the op transposes its tiles); both sides use
the same tensor.
glibc keeps freed blocks as in vaekit's training (:mod:`vaekit.malloc`).

    python bench/bench_sparse_linear.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from vaekit.data import load_mnist5k
from vaekit.malloc import keep_freed_memory
from vaekit.ops import cpu_kernel
from vaekit.ops.sparse_linear import MAX_DENSITY


def compare_ms(x: torch.Tensor, n_out: int, repeats: int) -> tuple[float, float]:
    """Best ms per forward + backward of F.linear and of the op (forced sparse), measured alternately."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n_out, x.shape[1], generator=g) / x.shape[1] ** 0.5).requires_grad_()  # [N, K], row-major
    b = torch.zeros(n_out, requires_grad=True)
    grad = torch.randn(x.shape[0], n_out, generator=g)
    dense = lambda: F.linear(x, w, b)  # noqa: E731
    sparse = lambda: torch.ops.vaekit.sparse_input_linear(x, w, b, 1.0)  # noqa: E731

    def run(fn, k: int) -> float:
        start = time.perf_counter()
        for _ in range(k):
            fn().backward(grad)
            w.grad = b.grad = None
        return (time.perf_counter() - start) / k * 1e3

    run(dense, 20), run(sparse, 20)
    best = {dense: float("inf"), sparse: float("inf")}
    for _ in range(repeats):
        for fn in best:
            best[fn] = min(best[fn], run(fn, 100))
    return best[dense], best[sparse]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    if not cpu_kernel.load():
        raise SystemExit(f"no C++ kernel: {cpu_kernel.status()}")
    digits = load_mnist5k().train_x[:128].reshape(128, -1).float()
    binarized = torch.bernoulli(digits, generator=torch.Generator().manual_seed(0))
    print(f"{args.threads} threads, batch 128, forward + backward, best of {args.repeats} alternating repeats; "
          f"the op uses the sparse kernel up to {MAX_DENSITY:.0%} nonzeros")
    print(f"{'input':<28} {'nonzero':>8} {'K→N':>9} {'F.linear ms':>12} {'sparse ms':>10} {'speed-up':>9}")
    cases = [("MNIST, binarized", binarized), ("MNIST, gray levels", digits)]
    cases += [(f"random 0/1, {p:.0%} ones", (torch.rand(128, 784, generator=torch.Generator().manual_seed(1)) < p).float())
              for p in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)]
    for n_out in (400, 1000):
        for name, x in cases:
            dense, sparse = compare_ms(x, n_out, args.repeats)
            print(f"{name:<28} {(x != 0).float().mean().item():>8.1%} {f'784→{n_out}':>9} {dense:>12.3f} {sparse:>10.3f} "
                  f"{dense / sparse:>8.2f}x")


if __name__ == "__main__":
    main()
