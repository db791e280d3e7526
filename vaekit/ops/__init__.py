"""Numerical kernels of the training pipeline.

``reparameterize_kl`` is the fused custom op ``vaekit::reparameterize_kl`` (C++ kernel on the
CPU, Triton on CUDA): ``z = μ + exp(½ log σ²) ⊙ ε`` and ``KL(N(μ, σ²) ‖ N(0, I))`` per sample,
forward and backward in one pass each.  ``reparameterize_kl_eager`` is the unfused formula (the
oracle and the ``--no-fused-op`` path).  ``mmd2_unbiased`` is the kernel two-sample statistic of
WAE-MMD and of the latent-space evaluation.  ``bernoulli_philox`` is ``vaekit::bernoulli_philox``
(C++ kernel on the CPU, torch operations elsewhere): Bernoulli draws from the counter-based Philox
generator, the training loop's dynamic binarization.
"""

from .fused import reparameterize_kl
from .philox import bernoulli_philox
from .mmd import kernel_matrix, mmd2_unbiased
from .reference import LOGVAR_MAX, LOGVAR_MIN, clamp_logvar, gaussian_kl, logvar_bounds, reparameterize_kl_eager

__all__ = ["LOGVAR_MAX", "LOGVAR_MIN", "bernoulli_philox", "clamp_logvar", "gaussian_kl", "kernel_matrix", "logvar_bounds",
           "mmd2_unbiased", "reparameterize_kl", "reparameterize_kl_eager"]
