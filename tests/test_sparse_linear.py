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
    """64 real digits in [0, 1], flattened [64, 784], and one dynamic binarization of them."""
    x = small_mnist.train_x[:64].reshape(64, -1).float()
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
        assert w.grad.stride() == w.stride()  # the gradient in the weight's layout: no copy in AccumulateGrad


def test_rows_and_batches_without_nonzeros():
    x = torch.zeros(5, 30)
    x[2, [0, 7, 29]] = torch.tensor([1.0, -2.0, 0.5])  # one row with values, four all-zero rows
    for batch in (x, torch.zeros(3, 30), torch.zeros(0, 30)):
        w, b = _weights(9, 30, k_major=True)
        g = torch.randn(batch.shape[0], 9)
        y = op(batch, w, b, 1.0)
        y.backward(g)
        ref_y, ref_w, ref_b = _reference(batch, w, b, g)
        torch.testing.assert_close(y.double(), ref_y)
        torch.testing.assert_close(w.grad.double(), ref_w)
        torch.testing.assert_close(b.grad.double(), ref_b)


@pytest.mark.parametrize("k_major", [False, True], ids=["row-major", "k-major"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradcheck_and_gradgradcheck_in_float64(k_major, with_bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 19, generator=g, dtype=torch.float64) * (torch.rand(6, 19, generator=g) < 0.2)
    w, b = _weights(11, 19, k_major, dtype=torch.float64)
    bias = b if with_bias else None
    for inputs in ((x.clone().requires_grad_(), w), (x, w)):  # x with and without a gradient
        f = (lambda x, w: op(x, w, bias, 1.0))
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)  # create_graph: the differentiable dense formulas


def test_torch_func_and_forward_ad_take_the_dense_formula():
    x = (torch.rand(4, 12, dtype=torch.float64) < 0.2).double()
    w, b = _weights(5, 12, k_major=True, dtype=torch.float64)
    grad = torch.func.grad(lambda w: sparse_input_linear(x, w, b).square().sum())(w.detach())
    ref = torch.func.grad(lambda w: F.linear(x, w, b).square().sum())(w.detach())
    torch.testing.assert_close(grad, ref)
    tangent = torch.randn_like(w)
    _, jvp = torch.func.jvp(lambda w: sparse_input_linear(x, w, b), (w.detach(),), (tangent,))
    torch.testing.assert_close(jvp, F.linear(x, tangent))


def test_dense_inputs_take_the_dense_product_exactly():
    x = torch.rand(16, 40) + 0.1  # no zeros: above MAX_DENSITY
    w, b = _weights(8, 40, k_major=True)
    assert torch.equal(sparse_input_linear(x, w, b), F.linear(x, w, b))
    assert MAX_DENSITY < 0.5


def test_shape_errors_are_linears():
    w, b = _weights(8, 40, k_major=True)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        sparse_input_linear(torch.zeros(3, 41), w, b)


def test_the_layer_is_a_linear_with_the_same_state_dict_and_training_step(digits):
    x = digits[1]
    torch.manual_seed(0)
    dense = nn.Linear(784, 50)
    sparse = SparseInputLinear(784, 50)
    assert sparse.weight.stride() == (1, 50) and isinstance(sparse, nn.Linear)
    sparse.load_state_dict(dense.state_dict())
    assert sparse.weight.stride() == (1, 50)
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
