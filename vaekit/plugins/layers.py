"""Small building blocks shared by the built-in encoders and decoders."""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from ..ops.sparse_linear import sparse_input_linear

Activation = Literal["relu", "elu", "gelu", "tanh", "sigmoid", "leaky_relu", "silu"]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def channels_last(module: nn.Module) -> nn.Module:
    """Store ``module``'s 4-D weights (convolution kernels) channels-last (NHWC); returns ``module``.

    The convolutions then take oneDNN's blocked kernels on the CPU (measured: the conv VAE's epoch
    2.98 → 2.45 s at 1 thread; its bench against a hand-written loop is in bench/README.md); their outputs are channels-last
    too.  Values and ``state_dict`` are unchanged: only the strides differ (checkpoints save contiguous
    copies, ``load_state_dict`` copies into these strides), and ``flatten`` reads a channels-last map
    in NCHW order, so a linear layer after it sees the same features."""
    return module.to(memory_format=torch.channels_last)


class Contiguous(nn.Module):
    """``module(x.contiguous())``: a channels-last map copied to NCHW order before ``module`` (an
    activation), where a ``flatten`` follows.  The copy a flatten of a channels-last map makes anyway
    moves before the activation, so the activation's input, output and gradient share one layout: its
    backward with a channels-last output and the flatten's NCHW gradient is ATen's strided elementwise
    path, ~30× slower than in one layout (2.5 against 0.07 ms at [128, 32, 14, 14], 2 threads; the conv
    VAE's [128, 64, 7, 7] about half that).  No parameters: ``state_dict`` is ``module``'s."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous())


class FewChannelConvTranspose2d(nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` (the same parameters, ``state_dict`` and output) computed as one
    matrix product and a col2im (:func:`torch.nn.functional.fold`), for a layer with few output channels.

    ``x [B, C, H, W]`` → ``cols = x_(BHW, C) @ W_(C, O·kh·kw)`` → ``fold`` (the overlapping patches summed
    into ``[B, O, H', W']``) → ``+ bias``: the transposed convolution's definition (Dumoulin & Visin 2016,
    "A guide to convolution arithmetic", §4).  oneDNN's and ATen's kernels are slow for one output
    channel (the conv decoder's last layer: 6.2 ms forward for a batch of 128 at 1 thread, 1.5 ms here;
    forward + backward 8.2 → 4.7 ms).  Groups, dilation, output padding and ``output_size`` take
    :func:`torch.nn.functional.conv_transpose2d`."""

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        if output_size is not None or self.groups != 1 or self.dilation != (1, 1) or self.output_padding != (0, 0) \
                or input.dim() != 4:
            padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                           self.dilation)  # as nn.ConvTranspose2d.forward (no super(): scriptable)
            return F.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, padding, self.groups,
                                      self.dilation)
        b, c, h, w = input.shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        cols = input.permute(0, 2, 3, 1).reshape(b * h * w, c) @ self.weight.reshape(c, -1)  # [BHW, O·kh·kw]
        cols = cols.view(b, h * w, -1).transpose(1, 2)
        size = [(h - 1) * sh - 2 * ph + kh, (w - 1) * sw - 2 * pw + kw]
        out = F.fold(cols, size, self.kernel_size, stride=self.stride, padding=self.padding)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1).to(out.dtype)  # autocast: the matmul's dtype


def conv_transpose(c_in: int, c_out: int, **options) -> nn.ConvTranspose2d:
    """A transposed convolution: :class:`FewChannelConvTranspose2d` for at most 4 output channels (an
    image's), else :class:`torch.nn.ConvTranspose2d`."""
    return (FewChannelConvTranspose2d if c_out <= 4 else nn.ConvTranspose2d)(c_in, c_out, **options)


class SparseInputLinear(nn.Linear):
    """:class:`torch.nn.Linear` (the same parameters, ``state_dict`` and, to rounding, output) for an input
    that is mostly zeros, as binarized images are: on the CPU the product is computed from the nonzeros of
    ``x [B, K]`` (:func:`vaekit.ops.sparse_linear.sparse_input_linear`, which takes the dense product when
    more than 30 % of the values are nonzero).  The first layer of an ``mlp`` encoder: forward + backward of
    MNIST's 784→400 for 128 binarized digits 0.6 against 1.1 ms on 2 threads (``bench/bench_sparse_linear.py``).
    The weight keeps torch's row-major layout (the kernel transposes it, ~0.05 ms): stored as Wᵀ, the
    fused Adam step copies its gradient to that layout every step, which costs more.  TorchScript (the
    exported model) gets ``F.linear``, as do the inputs the op leaves to it (other ranks, devices, dtypes)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.linear(input, self.weight, self.bias)
        return self._sparse(input)

    @torch.jit.unused
    def _sparse(self, input: torch.Tensor) -> torch.Tensor:
        return sparse_input_linear(input, self.weight, self.bias)


def mlp(sizes: list[int], act: str, final_activation: bool, sparse_input: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them; the first a
    :class:`SparseInputLinear` if ``sparse_input``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append((SparseInputLinear if sparse_input and i == 0 else nn.Linear)(a, b))
        if final_activation or i < len(sizes) - 2:
            layers.append(make_activation(act))
    return nn.Sequential(*layers)


def check_image_shape(shape: tuple[int, ...], n_down: int, who: str) -> None:
    """Raise ConfigError unless ``shape`` is ``(C, H, W)`` with H, W divisible by ``2**n_down``."""
    if len(shape) != 3:
        raise ConfigError(
            f"{who} needs image data [C, H, W]; this data has shape {list(shape)} (use --encoder mlp --decoder mlp)"
        )
    f = 2**n_down
    if shape[1] % f or shape[2] % f:
        raise ConfigError(
            f"{who} with {n_down} stride-2 layers needs H and W divisible by {f}; got {shape[1]}x{shape[2]}"
        )


def flat_size(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def check_positive(values: tuple[int, ...], what: str, empty: str | None = None) -> None:
    """ConfigError unless every size in ``values`` is >= 1 and, with ``empty`` (what to give instead),
    unless there is at least one (an empty ``hidden=`` would silently drop every layer)."""
    if empty is not None and not values:
        raise ConfigError(f"{what} are empty: {empty}")
    if any(v < 1 for v in values):
        raise ConfigError(f"{what} must be positive integers, got {values}")
