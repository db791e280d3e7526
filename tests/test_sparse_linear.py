"""``vaekit::sparse_input_linear`` and ``layers.SparseInputLinear``: ``x Wᵀ + b`` from the nonzeros of x.

The reference is ``F.linear`` in float64 (a dense GEMM: an independent computation); the op is run with
``max_density`` 1 (the sparse kernel whatever the input) and 0 (its dense fallback), on real binarized
and grayscale digits, in both weight layouts, and through the MLP encoder that uses it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaekit.ops import cpu_kernel
from vaekit.ops.sparse_linear import MAX_DENSITY, sparse_input_linear
from vaekit.plugins.encoders import MLPEncoder
from vaekit.plugins.layers import SparseInputLinear

pytestmark = pytest.mark.skipif(not cpu_kernel.load(), reason="vaekit's C++ kernels are not available")
op = torch.ops.vaekit.sparse_input_linear


@pytest.fixture(scope="module")
def digits(small_mnist):
    """130 real digits in [0, 1], flattened [130, 784], and one dynamic binarization of them (more rows than the
    kernel's chunk of 96, so the weight gradient's sums resume across chunks)."""
    x = small_mnist.train_x[:130].reshape(130, -1).float()
    return x, torch.bernoulli(x, generator=torch.Generator().manual_seed(0))


def _weights(n: int, k: int, k_major: bool, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=dtype) / k ** 0.5
    if k_major:
        w = w.t().contiguous().t()
    return w.requires_grad_(), torch.randn(n, generator=g, dtype=dtype).requires_grad_()


def _reference(x, w, b, g):
    """F.linear in float64, with its gradients for the output gradient g."""
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y = F.linear(x.double(), w64, b64)
    y.backward(g.double())
    return y, w64.grad, b64.grad


@pytest.mark.parametrize("k_major", [False, True], ids=["row-major", "k-major"])
@pytest.mark.parametrize("max_density", [1.0, 0.0], ids=["sparse", "dense"])
@pytest.mark.parametrize("pixels", ["binarized", "gray"])
def test_matches_a_float64_dense_product_on_real_digits(digits, k_major, max_density, pixels):
    x = digits[1] if pixels == "binarized" else digits[0]
    assert 0.05 < (x != 0).float().mean() < 0.3  # the inputs the op exists for
    for n in (400, 13, 70):  # register tiles of 64 columns, of 8, and a scalar remainder
        w, b = _weights(n, x.shape[1], k_major)
        g = torch.randn(x.shape[0], n, generator=torch.Generator().manual_seed(1))
        y = op(x, w, b, max_density)
        y.backward(g)
        ref_y, ref_w, ref_b = _reference(x, w, b, g)
        torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), ref_w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad.double(), ref_b, rtol=1e-5, atol=1e-5)
        assert w.grad.stride() == w.stride()  # the gradient in the weight's layout (a transposed view too)


@pytest.mark.parametrize("threads", [1, 3])
def test_every_split_over_threads(threads):
    """The threads split the outputs in whole vectors, and the rows too when there are few outputs (N <= 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n_out in (1, 8, 9, 65):
            x = torch.randn(17, 33, generator=torch.Generator().manual_seed(n_out)) * (torch.rand(17, 33) < 0.2)
            w, b = _weights(n_out, 33, k_major=False)
            g = torch.randn(17, n_out)
            y = op(x, w, b, 1.0)
            y.backward(g)
            ref_y, ref_w, ref_b = _reference(x, w, b, g)
            torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(w.grad.double(), ref_w, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


def test_rows_and_batches_without_nonzeros_and_layers_without_inputs():
    x = torch.zeros(5, 30)
    x[2, [0, 7, 29]] = torch.tensor([1.0, -2.0, 0.5])  # one row with values, four all-zero rows
    for batch in (x, torch.zeros(3, 30), torch.zeros(0, 30), torch.zeros(4, 0)):
        w, b = _weights(9, batch.shape[1], k_major=True)
        g = torch.randn(batch.shape[0], 9, generator=torch.Generator().manual_seed(2))
        y = op(batch, w, b, 1.0)
        y.backward(g)
        ref_y, ref_w, ref_b = _reference(batch, w, b, g)
        # float32 results against the float64 reference rounded to float32, at float32's tolerances
        torch.testing.assert_close(y, ref_y.float())
        torch.testing.assert_close(w.grad, ref_w.float())
        torch.testing.assert_close(b.grad, ref_b.float())


@pytest.mark.parametrize("k_major", [False, True], ids=["row-major", "k-major"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_and_gradgradcheck_in_float64(k_major, with_bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 19, generator=g, dtype=torch.float64) * (torch.rand(6, 19, generator=g) < 0.2)
    w, b = _weights(40, 19, k_major, dtype=torch.float64)  # 40 outputs: a tile of 8 float64 registers and one of 1
    bias = b if with_bias else None
    for inputs in ((x.clone().requires_grad_(), w), (x, w)):  # x with and without a gradient
        f = (lambda x, w: op(x, w, bias, 1.0))
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)  # create_graph: the differentiable dense formulas


def test_torch_func_and_forward_ad_give_the_closed_form():
    x = (torch.rand(4, 12, dtype=torch.float64) < 0.2).double()
    w, b = _weights(5, 12, k_major=True, dtype=torch.float64)
    w, b = w.detach(), b.detach()
    y = x @ w.T + b
    grad = torch.func.grad(lambda w: sparse_input_linear(x, w, b).square().sum())(w)
    torch.testing.assert_close(grad, 2 * y.T @ x)  # d/dW sum((x Wᵀ + b)²)
    tangent = torch.randn_like(w)
    _, jvp = torch.func.jvp(lambda w: sparse_input_linear(x, w, b), (w,), (tangent,))
    torch.testing.assert_close(jvp, x @ tangent.T)


@pytest.mark.parametrize("density", [0.1, 0.9], ids=["sparse", "dense"])
def test_cpu_autocast_gets_the_low_precision_product_and_trains(density):
    x = (torch.rand(8, 40) < density).float()
    w, b = _weights(8, 40, k_major=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_input_linear(x, w, b)
        direct = op(x, w, b, 0.3)  # the op itself leaves autocast to its caller: x's dtype either way
    assert y.dtype == torch.bfloat16 and direct.dtype == torch.float32
    (y.float().sum() + direct.sum()).backward()
    torch.testing.assert_close(w.grad, 2 * torch.ones(8, 8).T @ x, rtol=1e-2, atol=1e-2)


def test_the_weight_gradient_comes_from_the_nonzeros():
    """No dense product in the backward when x needs no gradient: the sparse sums, not a GEMM."""
    x = (torch.rand(32, 100, generator=torch.Generator().manual_seed(0)) < 0.15).float()
    w, _ = _weights(40, 100, k_major=True)
    y = op(x, w, None, 1.0)
    with torch.profiler.profile() as prof:
        y.backward(torch.ones_like(y))
    names = {e.key for e in prof.key_averages()}
    assert not names & {"aten::mm", "aten::addmm", "aten::linear"}, names
    torch.testing.assert_close(w.grad, torch.ones(32, 40).T @ x)


def test_dense_inputs_take_the_dense_product_exactly():
    x = torch.rand(16, 40) + 0.1  # no zeros: above MAX_DENSITY
    w, b = _weights(8, 40, k_major=True)
    assert (x != 0).float().mean() > MAX_DENSITY
    assert torch.equal(sparse_input_linear(x, w, b), F.linear(x, w, b))


def test_shapes_errors_and_broadcasts_are_linears():
    w, b = _weights(8, 40, k_major=True)
    x = (torch.rand(3, 40) < 0.2).float()
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        sparse_input_linear(torch.zeros(3, 41), w, b)
    for bias in (torch.ones(1), torch.tensor(2.0)):  # F.linear broadcasts these
        torch.testing.assert_close(sparse_input_linear(x, w, bias), F.linear(x, w, bias))
    with pytest.raises(RuntimeError) as ours:
        sparse_input_linear(x, w, torch.ones(9))
    with pytest.raises(RuntimeError) as torchs:
        F.linear(x, w, torch.ones(9))
    assert str(ours.value) == str(torchs.value)


def test_the_layer_is_a_linear_with_the_same_state_dict_and_training_step(digits):
    x = digits[1]
    torch.manual_seed(0)
    dense = nn.Linear(784, 50)
    sparse = SparseInputLinear(784, 50)
    assert sparse.weight.is_contiguous() and isinstance(sparse, nn.Linear)  # torch's layout: fused Adam copies no gradient
    sparse.load_state_dict(dense.state_dict())
    assert {k: v.shape for k, v in sparse.state_dict().items()} == {k: v.shape for k, v in dense.state_dict().items()}
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2, fused=True) for m in (dense, sparse)]
    for _ in range(3):
        for m, opt in zip((dense, sparse), optimizers):
            opt.zero_grad()
            m(x).relu().square().mean().backward()
            opt.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(sparse.bias, dense.bias, rtol=0, atol=1e-5)


def test_the_mlp_encoder_runs_the_kernel_on_binarized_digits_and_exports_without_it(digits):
    encoder = MLPEncoder((1, 28, 28), hidden=(64,))
    x = digits[1][:16].reshape(16, 1, 28, 28)
    with torch.profiler.profile() as prof:
        encoder(x).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert "vaekit::sparse_input_linear" in names and "aten::addmm" not in names, names
    for exported in (torch.jit.script(encoder), torch.jit.trace(encoder, x)):
        assert "vaekit::" not in str(exported.inlined_graph)  # no vaekit op: what the C++ runtime can load
        torch.testing.assert_close(exported(x), encoder(x), rtol=1e-5, atol=1e-5)
