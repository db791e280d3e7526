"""Maximum mean discrepancy between two samples (Gretton et al. 2012), as used by WAE-MMD."""

from __future__ import annotations

from typing import Iterable

import torch


def kernel_matrix(a: torch.Tensor, b: torch.Tensor, kernel: str, scale: float) -> torch.Tensor:
    """``k(a_i, b_j)`` for ``a [n, d]``, ``b [m, d]``; returns ``[n, m]``.

    ``imq``: ``C / (C + ‖a − b‖²)`` (inverse multiquadratic, Tolstikhin et al. 2018, §4);
    ``rbf``: ``exp(−‖a − b‖² / C)``.  ``scale`` is C.  Raises ValueError for another kernel.
    """
    d2 = torch.cdist(a, b).square()
    if kernel == "imq":
        return scale / (scale + d2)
    if kernel == "rbf":
        return torch.exp(-d2 / scale)
    raise ValueError(f"unknown kernel {kernel!r}; kernels: imq, rbf")


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel: str = "imq", scales: Iterable[float] = (1.0,)) -> torch.Tensor:
    """Unbiased estimate of MMD² between samples ``x [n, d]`` and ``y [m, d]`` (Gretton et al. 2012, eq. 3).

    ``MMD² = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j) − 2/(nm) Σ_{i,j} k(x_i, y_j)``,
    summed over the kernel ``scales`` (values of C).  Can be slightly negative when the
    distributions agree.  Raises ValueError if either sample has fewer than 2 points or the
    dimensions differ.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs samples [n, d] and [m, d]; got {tuple(x.shape)} and {tuple(y.shape)}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 points in each sample; got {n} and {m}")
    total = x.new_zeros(())
    for c in scales:
        kxx = kernel_matrix(x, x, kernel, c)
        kyy = kernel_matrix(y, y, kernel, c)
        kxy = kernel_matrix(x, y, kernel, c)
        total = total + (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        total = total + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        total = total - 2 * kxy.mean()
    return total
