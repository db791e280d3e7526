"""The counter-based Bernoulli draws of dynamic binarization and the fused Bernoulli log-likelihood,
against independent references: Random123's known-answer vectors, the binomial law, a KS test,
torch.distributions, and the eager formulas (the C++ kernels bit for bit)."""

import os

import pytest
import scipy.stats
import torch
from torch.distributions import Bernoulli, Independent

from vaekit.ops import cpu_kernel
from vaekit.ops.bernoulli import bernoulli_log_prob, bernoulli_log_prob_eager
from vaekit.ops.philox import bernoulli_philox, bernoulli_philox_eager, philox4x32, philox_uniform

NEEDS_KERNEL = pytest.mark.skipif(os.environ.get("VAEKIT_DISABLE_CPP_KERNEL", "") not in ("", "0"),
                                  reason="C++ kernel disabled")

# Random123 v1.14.0, tests/kat_vectors, the "philox4x32 10" lines: counter, key, expected output (hex words)
KAT = [("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
       ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
       ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1")]


def _words(text):
    return [int(w, 16) for w in text.split()]


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    out = philox4x32(torch.tensor([_words(counter)]), tuple(_words(key)))
    assert out[0].tolist() == _words(expected)


@NEEDS_KERNEL
def test_the_kernel_draws_the_known_answer_block():
    # element i of key 0 reads block 8*(i//32) + i%8, word (i//8)%4: elements 0, 8, 16, 24 are block 0's words
    assert cpu_kernel.load(), cpu_kernel.status()
    words = _words(KAT[0][2])
    for i, w in zip((0, 8, 16, 24), words):
        u = (w >> 8) * 2.0**-24  # the uniform of that word; p just above and at it
        p = torch.zeros(32)
        p[i] = u
        assert bernoulli_philox(p, 0)[i] == 0  # u < p is false at p = u
        p[i] = u + 2.0**-24
        assert bernoulli_philox(p, 0)[i] == 1


@NEEDS_KERNEL
@pytest.mark.parametrize("n, offset, seed, dtype", [
    (128 * 784, 0, 5, torch.float32), (1000, 37, 2**40 + 3, torch.float32), (129, 127, -5, torch.float64),
    (5, 0, 0, torch.float32), (300, 2**38 - 100, 77, torch.float32), (0, 3, 1, torch.float32),
    (4097, 1, 2**63 + 9, torch.float32)])
def test_the_cpu_kernel_equals_the_eager_formula_bit_for_bit(n, offset, seed, dtype):
    p = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    p[::7] = 0.0
    p[::11] = 1.0
    signed = seed - 2**64 if seed >= 2**63 else seed
    assert cpu_kernel.load(), cpu_kernel.status()  # the kernel, not the eager formula twice
    assert torch.equal(bernoulli_philox(p, seed, offset), bernoulli_philox_eager(p, signed, offset))


TRITON_MISSING = __import__("importlib").util.find_spec("triton") is None


@pytest.mark.skipif(TRITON_MISSING, reason="triton is not installed (pip install -e '.[test]')")
@pytest.mark.parametrize("n, offset, seed, dtype", [
    (128 * 784, 0, 5, torch.float32), (1037, 37, 2**62 + 5, torch.float32), (129, 2**40 + 3, -5, torch.float64),
    (2048, 31, 2**63 - 1, torch.float16), (0, 3, 1, torch.float32)])
def test_the_triton_kernel_equals_the_eager_formula_bit_for_bit(n, offset, seed, dtype):
    """The CUDA kernel (Triton's tl.philox), run by the interpreter on the CPU here (on the GPU where there is one)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from vaekit.ops import philox_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = torch.rand(n, dtype=dtype, generator=torch.Generator().manual_seed(n))
    p[::7] = 0.0
    p[::11] = 1.0
    expected = bernoulli_philox_eager(p, seed, offset)
    for launch in (None, torch.library.wrap_triton):  # as the op's CUDA kernel launches it (directly), and wrapped
        got = philox_triton.bernoulli_philox(p.to(device), seed, offset, launch=launch)
        assert got.dtype == dtype and torch.equal(got.cpu(), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_equal_the_cpu_kernels():
    from vaekit.ops import philox

    assert philox.TRITON_REGISTERED or TRITON_MISSING
    p = torch.rand(3, 128, 784, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bernoulli_philox(p.cuda(), 2**61 + 7, 1000).cpu(), bernoulli_philox(p, 2**61 + 7, 1000))


@NEEDS_KERNEL
def test_draws_depend_on_seed_and_index_alone():
    """A slice drawn at its offset equals that slice of the whole draw (torchrun ranks binarize their rows
    of a global batch so), and the thread count changes nothing."""
    assert cpu_kernel.load(), cpu_kernel.status()
    p = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    whole = bernoulli_philox(p, 123)
    for lo, hi in [(0, 1), (3, 17), (31, 64)]:
        assert torch.equal(bernoulli_philox(p[lo:hi], 123, lo * 784), whole[lo:hi])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(bernoulli_philox(p, 123), whole)
    finally:
        torch.set_num_threads(threads)
    assert whole.shape == p.shape and whole.dtype == p.dtype


@pytest.mark.parametrize("p", [0.0, 1e-3, 0.1, 0.5, 0.9, 1.0])
def test_frequencies_follow_the_binomial_law(p):
    n = 400_000
    draws = bernoulli_philox(torch.full((n,), p), 2024)
    if p in (0.0, 1.0):
        assert draws.eq(p).all()
        return
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(draws.mean()) - p) < 5 * sigma


def test_uniforms_pass_a_kolmogorov_smirnov_test_and_seeds_are_independent():
    u = philox_uniform(200_000, seed=99, offset=12345)
    assert scipy.stats.kstest(u.double().numpy(), "uniform").pvalue > 1e-3
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    half = torch.full((200_000,), 0.5)
    agree = (bernoulli_philox(half, 1) == bernoulli_philox(half, 2)).double().mean()
    assert abs(float(agree) - 0.5) < 5 * (0.25 / 200_000) ** 0.5  # two seeds: independent draws


def test_half_precision_and_bad_input():
    p = torch.rand(100, generator=torch.Generator().manual_seed(1))
    out = bernoulli_philox(p.half(), 7)
    assert out.dtype == torch.float16 and torch.equal(out.float(), bernoulli_philox_eager(p.half().float(), 7))
    with pytest.raises(ValueError, match="floating-point"):
        bernoulli_philox(torch.ones(3, dtype=torch.uint8), 1)
    with pytest.raises(ValueError, match="offset"):
        bernoulli_philox(p, 1, -1)
    with pytest.raises(ValueError, match="offset"):
        bernoulli_philox(p, 1, 2**63 - 5)  # past int64: never silently unwritten memory
    with pytest.raises(ValueError, match="seed"):
        bernoulli_philox(p, 2**64)


# --- the fused Bernoulli log-likelihood ---------------------------------------------------------

@NEEDS_KERNEL
@pytest.mark.parametrize("dtype, shape, dims", [(torch.float64, (5, 1, 4, 3), 3), (torch.float32, (128, 784), 1),
                                               (torch.float64, (3, 2, 9), 2), (torch.float32, (2, 3, 5), 0)])
def test_bernoulli_log_prob_matches_torch_distributions(dtype, shape, dims):
    g = torch.Generator().manual_seed(0)
    logits = (8 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
    x = (torch.rand(shape, generator=g) < 0.4).to(dtype)
    ours = bernoulli_log_prob(logits, x, dims)
    ref = Independent(Bernoulli(logits=logits), dims).log_prob(x) if dims else Bernoulli(logits=logits).log_prob(x)
    tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(ours, ref, **tol)
    with torch.no_grad():  # the op without autograd (no sigmoid kept), as evaluation calls it
        torch.testing.assert_close(bernoulli_log_prob(logits, x, dims), ref.detach(), **tol)
    weights = torch.randn(ours.shape, generator=g, dtype=dtype)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, **tol)


@NEEDS_KERNEL
def test_bernoulli_log_prob_under_torch_func_and_with_empty_samples():
    """torch.func transforms and forward-mode AD take the eager formula (a C++ autograd Function supports
    neither); samples with no values give 0."""
    logits, x = torch.randn(3, 4, dtype=torch.float64), (torch.rand(3, 4, dtype=torch.float64) < 0.5).double()
    per_sample = torch.func.vmap(torch.func.grad(lambda a, b: bernoulli_log_prob(a, b, 1)))(logits, x)
    torch.testing.assert_close(per_sample, x - torch.sigmoid(logits))
    assert torch.equal(bernoulli_log_prob(torch.randn(3, 0), torch.ones(3, 0), 1), torch.zeros(3))


@NEEDS_KERNEL
def test_bernoulli_log_prob_gradcheck_broadcast_and_double_backward():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.rand(2, 3, generator=g, dtype=torch.float64, requires_grad=True)  # grey levels broadcast over the batch
    assert torch.autograd.gradcheck(lambda a, b: bernoulli_log_prob(a, b, 2), (logits, x))
    assert torch.autograd.gradgradcheck(lambda a, b: bernoulli_log_prob(a, b, 2), (logits, x))
    torch.testing.assert_close(bernoulli_log_prob(logits, x, 2), bernoulli_log_prob_eager(logits, x, 2))


@NEEDS_KERNEL
def test_bernoulli_log_prob_float32_softplus_is_within_a_few_ulp():
    """The float32 kernel's log1p(exp(-|l|)) is a series (not Sleef's log1p): -log p(x | l) = softplus(∓l)
    against float64's, over logits from -40 to 40, within 2⁻²¹ relative (4 ulp at the bottom of a
    binade).  Each logit fills a row of 16 values (the kernel's vector path; a row's sum of 16 equal
    values, divided by 16, is exact)."""
    logits = torch.linspace(-40, 40, 100_001).view(-1, 1)
    for x, sign in ((0.0, 1.0), (1.0, -1.0)):  # -log p(0 | l) = softplus(l), -log p(1 | l) = softplus(-l)
        rows = logits.expand(-1, 16).contiguous()
        ours = -bernoulli_log_prob(rows, torch.full_like(rows, x), 1).double() / 16
        ref = torch.nn.functional.softplus(sign * logits.double()).view(-1)  # down to 4e-18
        assert ((ours - ref).abs() / ref).max().item() < 2.0**-21  # seen: 4.2·2⁻²⁴ (Sleef's log1p: 1.9·2⁻²⁴; two terms fewer: 111·2⁻²⁴)


@NEEDS_KERNEL
def test_draws_are_constants_to_autograd_and_take_no_python_on_the_cpu():
    """Probabilities that need a gradient give draws that need none (0/1 constants), through the C++ autograd
    kernel: no torch.library autograd wrapper runs."""
    from conftest import PythonCalls

    p = torch.rand(4, 5, requires_grad=True)
    bernoulli_philox(p.detach(), 3)  # builds and registers the kernels
    with PythonCalls() as calls:
        draws = torch.ops.vaekit.bernoulli_philox.default(p, 3, 0)
    assert calls.under("torch/_library", "vaekit/ops") == []
    assert not draws.requires_grad and torch.equal(draws, bernoulli_philox_eager(p.detach(), 3))
    assert not bernoulli_philox(p, 3).requires_grad  # the wrapper detaches, whatever the device


def test_bernoulli_log_prob_takes_the_kernel_on_the_cpu():
    if os.environ.get("VAEKIT_DISABLE_CPP_KERNEL", "") not in ("", "0"):
        pytest.skip("C++ kernel disabled")
    logits = torch.randn(8, 784, requires_grad=True)
    out = bernoulli_log_prob(logits, torch.ones(8, 784), 1)
    fn = out.grad_fn
    names = []
    while fn is not None:  # the op's node, under the view back to the batch shape
        names.append(fn.name())
        fn = fn.next_functions[0][0] if fn.next_functions else None
    assert any("BernoulliLogProb" in name for name in names), names
