"""``vaekit::reparameterize_kl``: reparameterised sample and KL to N(0, I) in one fused op.

Registered with ``torch.library.custom_op`` (schema, fake/meta implementation, fused autograd),
with a vectorised C++ kernel on the CPU and Triton kernels on CUDA; any other device uses the
eager formulas.  The backward pass is an op of its own, ``vaekit::reparameterize_kl_backward``,
so both directions are one pass over memory and both trace under ``torch.compile``.  On the CPU
the autograd is C++ too (``csrc/reparameterize_kl.cpp``, registered for ``AutogradCPU`` with the
kernels): the same formulas as :func:`_backward` below without a Python node, ~60 µs less per
training step; elsewhere it is :func:`_backward`.  Under ``torch.func`` transforms and forward-mode
AD, which neither supports, :func:`reparameterize_kl` computes the eager formulas instead (the same
values and gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_kernel
from .reference import compute_dtype, reparameterize_grad_eps, reparameterize_kl_backward_eager, reparameterize_kl_eager


def _rows(t: Tensor) -> Tensor:
    """``[..., d]`` -> contiguous ``[rows, d]``."""
    return t.reshape(-1, t.shape[-1]).contiguous() if t.dim() else t.reshape(1, 1)


# --- forward ---------------------------------------------------------------------------------
# The CPU kernels are registered from C++ (cpu_kernel.py) the first time the op runs on the CPU;
# until then, and on devices without a kernel, the op runs these default implementations.

def _cpu_kernel_ready(t: Tensor) -> bool:
    return t.device.type == "cpu" and cpu_kernel.load()


@torch.library.custom_op("vaekit::reparameterize_kl", mutates_args=())
def _op(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Default implementation: the eager formulas (or, on the first CPU call, the just-built kernel)."""
    if _cpu_kernel_ready(mu):
        return torch.ops.vaekit.reparameterize_kl.default(mu, logvar, eps)
    z, kl = reparameterize_kl_eager(mu, logvar, eps)
    return z.contiguous(), kl.contiguous()


@_op.register_fake
def _(mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(mu, memory_format=torch.contiguous_format),
            mu.new_empty(mu.shape[:-1], dtype=compute_dtype(mu.dtype)))


# Under autocast the op runs in float32, like torch's own exp/sum (its KL is a loss term).
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast("vaekit::reparameterize_kl", _device_type, torch.float32)


# --- backward ---------------------------------------------------------------------------------

@torch.library.custom_op("vaekit::reparameterize_kl_backward", mutates_args=())
def _backward_op(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. μ and log σ² (default implementation: the eager formulas)."""
    if _cpu_kernel_ready(mu):
        return torch.ops.vaekit.reparameterize_kl_backward.default(grad_z, grad_kl, mu, logvar, eps)
    gmu, glv = reparameterize_kl_backward_eager(grad_z, grad_kl, mu, logvar, eps)
    return gmu.contiguous(), glv.contiguous()


@_backward_op.register_fake
def _(grad_z, grad_kl, mu, logvar, eps):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), torch.empty_like(mu, memory_format=torch.contiguous_format)


# --- CUDA (Triton) ------------------------------------------------------------------------------

def _register_triton() -> bool:
    try:
        from . import triton_kernels
    except Exception:  # noqa: BLE001 - no triton: CUDA uses the default implementation
        return False
    # launched directly: the ops are opaque to torch.compile (their fake kernels trace), so their CUDA
    # kernels see real tensors; torch.library.wrap_triton's dispatch is "slow enough to matter (~1ms)" in eager
    # mode (torch's own comment, torch/_library/triton.py; not measured here: no GPU)
    @_op.register_kernel("cuda")
    def _(mu, logvar, eps):
        z, kl = triton_kernels.forward(*(_rows(t) for t in (mu, logvar, eps)))
        return z.view(mu.shape), kl.view(mu.shape[:-1])

    @_backward_op.register_kernel("cuda")
    def _(grad_z, grad_kl, mu, logvar, eps):
        gmu, glv = triton_kernels.backward(_rows(grad_z), grad_kl.reshape(-1).contiguous(),
                                           *(_rows(t) for t in (mu, logvar, eps)))
        return gmu.view(mu.shape), glv.view(mu.shape)

    return True


TRITON_REGISTERED = torch.cuda.is_available() and _register_triton()


# --- autograd -----------------------------------------------------------------------------------

def _setup_context(ctx, inputs, output) -> None:
    mu, logvar, eps = inputs
    ctx.save_for_backward(mu, logvar, eps)


def _backward(ctx, grad_z: Tensor, grad_kl: Tensor):
    mu, logvar, eps = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: stay differentiable (double backward)
        gmu, glv = reparameterize_kl_backward_eager(grad_z, grad_kl, mu, logvar, eps)
    else:
        gmu, glv = _BACKWARD(grad_z, grad_kl, mu, logvar, eps)
    geps = None
    if ctx.needs_input_grad[2]:
        geps = reparameterize_grad_eps(grad_z, logvar)
    return gmu, glv, geps


_op.register_autograd(_backward, setup_context=_setup_context)

# Calling the OpOverloads directly skips the Python layers of CustomOpDef.__call__ (tens of µs).
_FORWARD = torch.ops.vaekit.reparameterize_kl.default
_BACKWARD = torch.ops.vaekit.reparameterize_kl_backward.default


# --- public wrapper -----------------------------------------------------------------------------

def reparameterize_kl(mu: Tensor, logvar: Tensor, eps: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Reparameterised sample and KL to the standard normal, fused (Kingma & Welling 2014).

    ``z = μ + exp(½ log σ²) ⊙ ε`` and ``KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_k (σ_k² + μ_k² − 1 − log σ_k²)``.

    mu, logvar: ``[..., d]``, same shape and floating dtype; eps: ``[..., d]`` standard-normal
    noise, or None to draw it here with ``torch.randn_like(mu)`` (the RNG of ``mu``'s device, so
    ``torch.manual_seed`` makes it reproducible; the op itself is deterministic).  Returns
    ``z [..., d]`` in the dtype of ``mu`` and ``kl [...]`` in nats.  Any leading batch
    dimensions, non-contiguous inputs and empty batches are accepted.

    Numerics (the same in the C++, Triton and eager implementations, see
    :mod:`vaekit.ops.reference`): float16/bfloat16 inputs are computed in float32 and the KL is
    returned in float32; log σ² is clamped to [−30, 30] ([−30, 11] for float16, so σ² fits the
    dtype) before exponentiating, so no value overflows however far outside that range it is;
    the gradient w.r.t. log σ² passes straight through the clamp (evaluated at the clamped
    value), so the KL still pulls an out-of-range log σ² back.  That gradient is at most
    ``½(|grad_z|·σ·|ε| + |grad_kl|·e^{hi})``: finite in float32, while a float16 gradient
    overflows if ``|grad_kl|`` exceeds about 2 at the bound (a mean-reduced loss gives β/B).
    Under ``torch.autocast`` the op runs in float32.

    Raises ValueError if the shapes or dtypes of ``mu``, ``logvar`` (and ``eps``) differ.
    """
    if mu.shape != logvar.shape or mu.dtype != logvar.dtype:
        raise ValueError(
            f"mu and logvar must match: mu {tuple(mu.shape)} {mu.dtype}, logvar {tuple(logvar.shape)} {logvar.dtype}"
        )
    if not mu.dtype.is_floating_point:
        raise ValueError(f"mu and logvar must be floating point, got {mu.dtype}")
    if mu.dim() == 0:
        raise ValueError("mu and logvar must have a latent dimension: shape [..., d]")
    if eps is None:
        eps = torch.randn_like(mu)
    elif eps.shape != mu.shape or eps.dtype != mu.dtype:
        raise ValueError(f"eps must match mu: mu {tuple(mu.shape)} {mu.dtype}, eps {tuple(eps.shape)} {eps.dtype}")
    if not cpu_kernel.autograd_modes_supported():
        return reparameterize_kl_eager(mu, logvar, eps)  # the op's autograd (C++ or Python) has no such modes
    if mu.device.type == "cpu" and not torch.compiler.is_compiling():
        # register the C++ kernels before the op first runs: its Python default implementation, which
        # torch wraps in a dynamo guard, would import torch._dynamo (and sympy: ~150 MB of RSS) on that call
        cpu_kernel.load()
    return _FORWARD(mu, logvar, eps)
