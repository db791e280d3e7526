"""Numerical kernels of the training pipeline.

``reparameterize_kl`` draws ``z = μ + exp(½ log σ²) ⊙ ε`` and computes
``KL(N(μ, σ²) ‖ N(0, I))`` per sample.  This is the eager reference
implementation; the fused custom op (CPU and CUDA kernels) replaces it behind
the same signature.  ``mmd2_unbiased`` is the kernel two-sample statistic of
WAE-MMD and of the latent-space evaluation.
"""

from .mmd import kernel_matrix, mmd2_unbiased
from .reference import gaussian_kl, reparameterize_kl

__all__ = ["gaussian_kl", "kernel_matrix", "mmd2_unbiased", "reparameterize_kl"]
