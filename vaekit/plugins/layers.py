"""Small building blocks shared by the built-in encoders and decoders."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError

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

    The convolutions then take oneDNN's blocked kernels on the CPU (the conv VAE's training step:
    13 % faster at 1 thread, bench/README.md) and tensor cores on CUDA; their outputs are channels-last
    too.  Values and ``state_dict`` are unchanged: only the strides differ (checkpoints save contiguous
    copies, ``load_state_dict`` copies into these strides), and ``flatten`` reads a channels-last map
    in NCHW order, so a linear layer after it sees the same features."""
    return module.to(memory_format=torch.channels_last)


def mlp(sizes: list[int], act: str, final_activation: bool) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
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
