"""The fused reparameterize + KL op against its oracle: the eager formula and torch.distributions."""

import importlib.util
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaekit.ops import cpu_kernel, reparameterize_kl, reparameterize_kl_eager
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
    assert torch.autograd.gradgradcheck(reparameterize_kl, (mu, logvar, eps))  # double backward, eager path


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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_accumulates_in_float32(dtype):
    mu, logvar, eps = _inputs((8, 512), torch.float32, grad=False, scale=1.0)
    z, kl = reparameterize_kl(mu.to(dtype), logvar.to(dtype), eps.to(dtype))
    assert z.dtype == dtype and kl.dtype == dtype
    _, kl32 = reparameterize_kl(mu.to(dtype).float(), logvar.to(dtype).float(), eps.to(dtype).float())
    assert torch.allclose(kl.float(), kl32, rtol=1e-2)  # only the final rounding to half differs
    naive = (0.5 * (logvar.to(dtype).exp() + mu.to(dtype) ** 2 - 1 - logvar.to(dtype))).sum(-1, dtype=dtype)
    assert (kl.float() - kl32).abs().max() <= (naive.float() - kl32).abs().max() + 1e-3


def test_extreme_logvar_neither_overflows_nor_gives_nan_gradients():
    mu = torch.zeros(2, 4, requires_grad=True)
    logvar = torch.tensor([[-1000.0, -100.0, 100.0, 1000.0], [-31.0, 31.0, 88.0, 200.0]], requires_grad=True)
    z, kl = reparameterize_kl(mu, logvar, torch.randn(2, 4))
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    (z.sum() + kl.sum()).backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(logvar.grad).all()
    # the gradient passes straight through the clamp: the KL still pulls log σ² back into range
    assert (logvar.grad[0, 2:] > 0).all() and (logvar.grad[0, :2] < 0).all()


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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 5), (4, 37), (2, 1100), (0, 4)])
def test_triton_kernels_match_the_reference(dtype, shape):
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from vaekit.ops import triton_kernels

    mu, logvar, eps = _inputs(shape, dtype, grad=False, scale=20.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mu, logvar, eps = mu.to(device), logvar.to(device), eps.to(device)
    gz, gk = torch.randn(shape, dtype=dtype, device=device), torch.randn(shape[:-1], dtype=dtype, device=device)
    z, kl = triton_kernels.forward(mu, logvar, eps)
    zr, klr = reparameterize_kl_eager(mu, logvar, eps)
    gmu, glv = triton_kernels.backward(gz, gk, mu, logvar, eps)
    gmur, glvr = reparameterize_kl_backward_eager(gz, gk, mu, logvar, eps)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-8)
    for a, b in ((z, zr), (kl, klr), (gmu, gmur), (glv, glvr)):
        assert torch.allclose(a, b, **tol)
