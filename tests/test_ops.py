"""The fused reparameterize + KL op against its oracle: the eager formula and torch.distributions."""

import importlib.util
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaekit.ops import cpu_kernel, reparameterize_kl, reparameterize_kl_eager
from vaekit.ops.reference import compute_dtype as klr_dtype
from vaekit.ops.reference import reparameterize_kl_backward_eager

SHAPES = [(1, 1), (4, 3), (7, 33), (2, 3, 17), (64, 256)]


def _inputs(shape, dtype=torch.float64, grad=True, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=dtype)
    logvar = scale * torch.randn(shape, generator=g, dtype=dtype)
    eps = torch.randn(shape, generator=g, dtype=dtype)
    return mu.requires_grad_(grad), logvar.requires_grad_(grad), eps


def test_the_cpu_kernel_is_the_compiled_one():
    if os.environ.get("VAEKIT_DISABLE_CPP_KERNEL", "") not in ("", "0"):
        pytest.skip("C++ kernel disabled")
    assert cpu_kernel.status().startswith("C++ kernel"), cpu_kernel.status()


@pytest.mark.parametrize("shape", SHAPES)
def test_opcheck(shape):
    mu, logvar, eps = _inputs(shape)
    torch.library.opcheck(torch.ops.vaekit.reparameterize_kl.default, (mu, logvar, eps))
    grads = (torch.randn(shape, dtype=torch.float64), torch.randn(shape[:-1], dtype=torch.float64))
    torch.library.opcheck(torch.ops.vaekit.reparameterize_kl_backward.default,
                          (*grads, mu.detach(), logvar.detach(), eps))


@pytest.mark.parametrize("shape", SHAPES[:4])
def test_gradcheck_float64(shape):
    mu, logvar, eps = _inputs(shape)
    eps.requires_grad_(True)
    assert torch.autograd.gradcheck(reparameterize_kl, (mu, logvar, eps))
    assert torch.autograd.gradgradcheck(reparameterize_kl, (mu, logvar, eps))  # double backward: differentiable formulas


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_distributions(shape, dtype):
    mu, logvar, eps = _inputs(shape, dtype, grad=False)
    z, kl = reparameterize_kl(mu, logvar, eps)
    std = torch.exp(0.5 * logvar)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    assert torch.allclose(kl, kl_divergence(Normal(mu, std), Normal(0.0, 1.0)).sum(-1), **tol)
    assert torch.allclose(z, mu + std * eps, **tol)


def test_eps_none_draws_like_normal_rsample():
    """With eps=None the op draws ε with torch.randn_like from the global RNG: Normal(μ, σ).rsample() under the same seed."""
    mu, logvar, _ = _inputs((5, 4), torch.float32, grad=False)
    torch.manual_seed(7)
    z, _ = reparameterize_kl(mu, logvar)
    torch.manual_seed(7)
    expected = Normal(mu, torch.exp(0.5 * logvar)).rsample()
    assert torch.allclose(z, expected, atol=1e-6)


def test_gradients_match_autograd_of_the_eager_formula():
    mu, logvar, eps = _inputs((16, 40), torch.float32)
    gz, gk = torch.randn(16, 40), torch.randn(16)
    torch.autograd.backward(reparameterize_kl(mu, logvar, eps), (gz, gk))
    fused = (mu.grad.clone(), logvar.grad.clone())
    mu.grad = logvar.grad = None
    torch.autograd.backward(reparameterize_kl_eager(mu, logvar, eps), (gz, gk))
    assert torch.allclose(fused[0], mu.grad, atol=1e-5) and torch.allclose(fused[1], logvar.grad, rtol=1e-5, atol=1e-5)


def test_the_cpu_autograd_runs_in_cpp_without_python():
    """On the CPU the op's autograd is a C++ node: forward and backward call no Python (no
    torch.library autograd wrapper, no vaekit.ops.fused backward), with the gradients of the eager
    formula; a gradient of the gradient (double backward) is built from differentiable operations."""
    if os.environ.get("VAEKIT_DISABLE_CPP_KERNEL", "") not in ("", "0"):
        pytest.skip("C++ kernel disabled")
    from conftest import PythonCalls

    mu, logvar, eps = _inputs((16, 40), torch.float32)
    reparameterize_kl(mu, logvar, eps)  # builds and registers the kernels
    gz, gk = torch.randn(16, 40), torch.randn(16)
    with PythonCalls() as calls:
        z, kl = torch.ops.vaekit.reparameterize_kl.default(mu, logvar, eps)
        grads = torch.autograd.grad((z, kl), (mu, logvar), (gz, gk))
    assert calls.under("torch/_library", "vaekit/ops") == []
    expected = torch.autograd.grad(reparameterize_kl_eager(mu, logvar, eps), (mu, logvar), (gz, gk))
    for ours, ref in zip(grads, expected):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the backward op called by hand with inputs that need a gradient: its differentiable formula
    args = [t.detach().double().requires_grad_() for t in (gz, gk, mu, logvar, eps)]
    assert torch.autograd.gradcheck(torch.ops.vaekit.reparameterize_kl_backward.default, args)


def test_torch_func_and_forward_mode_ad_take_the_eager_formula():
    """Neither autograd of the op (C++ on the CPU, Python elsewhere) supports torch.func transforms or
    forward-mode AD: the wrapper computes the eager formulas there, so per-sample gradients and
    tangents are the closed form's (∂KL/∂μ = μ, ∂KL/∂log σ² = ½(σ² − 1); ∂z/∂μ = 1)."""
    import torch.autograd.forward_ad as fwAD

    mu, logvar, eps = (t.detach() for t in _inputs((5, 3)))
    grad_mu, grad_lv = torch.func.vmap(torch.func.grad(lambda m, l, e: reparameterize_kl(m, l, e)[1], argnums=(0, 1)))(mu, logvar, eps)
    torch.testing.assert_close(grad_mu, mu)
    torch.testing.assert_close(grad_lv, 0.5 * (logvar.exp() - 1))
    tangent = torch.randn_like(mu)
    _, (z_dot, kl_dot) = torch.func.jvp(lambda m: reparameterize_kl(m, logvar, eps), (mu,), (tangent,))
    torch.testing.assert_close(z_dot, tangent)
    torch.testing.assert_close(kl_dot, (mu * tangent).sum(-1))
    with fwAD.dual_level():
        z, kl = reparameterize_kl(fwAD.make_dual(mu, tangent), logvar, eps)
        torch.testing.assert_close(fwAD.unpack_dual(kl).tangent, (mu * tangent).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    """fp16/bf16 inputs: KL within 2% of float32 for log σ² ∈ [−8, 8], returned in float32; z in the input dtype."""
    g = torch.Generator().manual_seed(0)
    mu, eps = torch.randn(64, 128, generator=g), torch.randn(64, 128, generator=g)
    logvar = torch.empty(64, 128).uniform_(-8, 8, generator=g)
    z, kl = reparameterize_kl(mu.to(dtype), logvar.to(dtype), eps.to(dtype))
    assert z.dtype == dtype and kl.dtype == torch.float32
    _, kl32 = reparameterize_kl(mu, logvar, eps)
    assert ((kl - kl32).abs() / kl32).max() < 0.02
    m, lv, e = (t.to(dtype).double() for t in (mu, logvar, eps))  # the same rounded inputs, in float64
    reference = kl_divergence(Normal(m, torch.exp(0.5 * lv)), Normal(0.0, 1.0)).sum(-1)
    assert ((kl.double() - reference).abs() / reference).max() < 1e-5  # only float32 rounding
    assert torch.allclose(z.double(), m + torch.exp(0.5 * lv) * e, rtol=1e-2, atol=1e-2)


def test_float16_never_overflows():
    """σ² of float16 overflows from log σ² ≈ 11.1 on: the float16 clamp keeps z, KL and gradients finite."""
    logvar = torch.tensor([[8.0, 10.0, 11.0, 12.0, 20.0, 29.0, 40.0, -40.0]], dtype=torch.float16, requires_grad=True)
    mu = torch.zeros_like(logvar, requires_grad=True)
    eps = torch.full_like(logvar, 3.0)
    for op in (reparameterize_kl, reparameterize_kl_eager):
        z, kl = op(mu, logvar, eps)
        (z.float().sum() + kl.sum()).backward()
        assert torch.isfinite(z).all() and torch.isfinite(kl).all(), op.__name__
        assert torch.isfinite(logvar.grad).all() and torch.isfinite(mu.grad).all(), op.__name__
        mu.grad = logvar.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_equals_eager_over_the_whole_logvar_range(dtype):
    """One semantics: values and gradients of the fused op and of autograd through the eager formula
    agree for log σ² ∈ [−40, 40] (beyond the clamp too, whose bound depends on the dtype), and every
    gradient is finite."""
    logvar = torch.linspace(-40, 40, 801).reshape(9, 89).to(dtype).requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(9, 89, generator=g).to(dtype).requires_grad_(True)
    eps = torch.randn(9, 89, generator=g).to(dtype).requires_grad_(True)
    gz, gk = torch.randn(9, 89, generator=g).to(dtype), torch.rand(9, generator=g)
    results = []
    for op in (reparameterize_kl, reparameterize_kl_eager):
        z, kl = op(mu, logvar, eps)
        torch.autograd.backward((z, kl), (gz, gk))
        results.append([z.detach(), kl.detach()] + [t.grad.clone() for t in (mu, logvar, eps)])
        for t in (mu, logvar, eps):
            t.grad = None
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for name, fused, eager in zip(("z", "kl", "grad mu", "grad logvar", "grad eps"), *results):
        assert torch.isfinite(fused).all(), name
        assert fused.dtype == eager.dtype, name
        assert torch.allclose(fused.double(), eager.double(), **tol), name
    # beyond the clamp the gradient passes straight through, ½(grad_z·σ·ε + grad_kl·(σ² − 1)) at the
    # bound, written out here from the formula: the KL pulls log σ² back into range
    hi = 11.0 if dtype == torch.float16 else 30.0
    lv = logvar.detach().double()
    s = torch.exp(0.5 * lv.clamp(-30, hi))
    expected = 0.5 * (gz.double() * s * eps.detach().double() + gk[:, None].double() * (s.square() - 1))
    beyond = (lv < -30) | (lv > hi)
    assert torch.allclose(results[0][3].double()[beyond], expected[beyond], rtol=1e-2 if dtype != torch.float32 else 1e-5)
    assert (results[0][3][lv < -30] < 0).all() and (results[0][3][lv > hi] > 0).all()


def test_autocast_runs_the_op_in_float32():
    """Under torch.autocast a bf16 head output reaches the op as float32 (register_autocast)."""
    head = torch.nn.Linear(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        params = head(torch.randn(5, 6))
        assert params.dtype == torch.bfloat16
        z, kl = reparameterize_kl(*params.chunk(2, -1))
    assert z.dtype == torch.float32 and kl.dtype == torch.float32


def test_leading_dims_non_contiguous_and_empty():
    mu, logvar, eps = _inputs((3, 10, 6), torch.float32, grad=False)
    t = (mu.transpose(0, 1), logvar.transpose(0, 1), eps.transpose(0, 1))
    assert not t[0].is_contiguous()
    z, kl = reparameterize_kl(*t)
    zr, klr = reparameterize_kl_eager(*t)
    assert z.shape == (10, 3, 6) and kl.shape == (10, 3)
    assert torch.allclose(z, zr, atol=1e-6) and torch.allclose(kl, klr, atol=1e-5)
    z, kl = reparameterize_kl(torch.zeros(0, 5), torch.zeros(0, 5))
    assert z.shape == (0, 5) and kl.shape == (0,)
    mu0 = torch.zeros(0, 5, requires_grad=True)
    z, kl = reparameterize_kl(mu0, torch.zeros(0, 5))
    (z.sum() + kl.sum()).backward()
    assert mu0.grad.shape == (0, 5)


@pytest.mark.parametrize(
    "mu,logvar,message",
    [(torch.zeros(4, 3), torch.zeros(4, 2), r"mu \(4, 3\) torch.float32, logvar \(4, 2\)"),
     (torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.float64), "logvar \\(4, 3\\) torch.float64"),
     (torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3, dtype=torch.long), "floating point")],
)
def test_bad_inputs_raise_value_errors(mu, logvar, message):
    with pytest.raises(ValueError, match=message):
        reparameterize_kl(mu, logvar)


def test_torch_compile_fullgraph_over_a_model_using_the_op():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 8)

    def step(x, eps):
        mu, logvar = head(x).chunk(2, -1)
        z, kl = reparameterize_kl(mu, logvar, eps)
        return (z.square().sum(-1) + kl).mean()

    x, eps = torch.randn(5, 6), torch.randn(5, 4)
    expected = step(x, eps)
    expected.backward()
    grads = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(x, eps)
    got.backward()
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(head.parameters(), grads))


# --- the Triton kernels, in interpreter mode on the CPU --------------------------------------------

triton_missing = importlib.util.find_spec("triton") is None


@pytest.mark.skipif(triton_missing, reason="triton is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5), (4, 37), (2, 1100), (0, 4)])
def test_triton_kernels_match_the_reference(dtype, shape):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from vaekit.ops import triton_kernels

    mu, logvar, eps = _inputs(shape, dtype, grad=False, scale=20.0)  # log σ² beyond the clamp too
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mu, logvar, eps = mu.to(device), logvar.to(device), eps.to(device)
    gz, gk = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape[:-1], device=device).to(klr_dtype(dtype))
    z, kl = triton_kernels.forward(mu, logvar, eps)
    zr, klr = reparameterize_kl_eager(mu, logvar, eps)
    gmu, glv = triton_kernels.backward(gz, gk, mu, logvar, eps)
    gmur, glvr = reparameterize_kl_backward_eager(gz, gk, mu, logvar, eps)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-8)}.get(
        dtype, dict(rtol=1e-2, atol=1e-2))
    assert kl.dtype == klr.dtype and z.dtype == dtype
    for a, b in ((z, zr), (kl, klr), (gmu, gmur), (glv, glvr)):
        assert torch.allclose(a, b, **tol)


def test_triton_kernels_compile_offline_for_sm80_and_sm90():
    """Every Triton kernel under vaekit/ compiles to a cubin for sm_80 and sm_90 in fp32/fp16/bf16,
    through Triton's real compiler (the interpreter misses compile errors), without a GPU."""
    if triton_missing:
        pytest.skip("triton is not installed (pip install -e '.[test]')")
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "compile_triton_kernels.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    # the fused op's 2 kernels x 2 targets x 3 dtypes; the Philox kernel x 2 targets x float32/float64
    assert "16 compiled, 0 failed" in out.stdout, out.stdout
