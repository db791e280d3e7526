"""Built-in encoders: ``mlp``, ``conv`` and ``linear``."""

from __future__ import annotations

import torch
from torch import nn

from .. import hookimpl
from ..interfaces import Encoder
from .layers import (Activation, Contiguous, channels_last, check_image_shape, check_positive, flat_size, make_activation,
                     mlp)


class MLPEncoder(Encoder):
    """Fully connected encoder: flatten ``x [B, *S]``, then Linear+activation per hidden size.

    Output ``h [B, hidden[-1]]``.

    :param hidden: hidden layer sizes, e.g. ``400`` or ``500,500,2000`` (at least one; ``--encoder linear`` has none).
    :param activation: nonlinearity after every hidden layer.
    """

    def __init__(self, input_shape, *, hidden: tuple[int, ...] = (400,), activation: Activation = "relu"):
        super().__init__(input_shape)
        check_positive(hidden, "mlp hidden sizes", "give at least one layer size (hidden=400), or use --encoder linear for a linear map")
        sizes = [flat_size(self.input_shape), *hidden]
        self.net = mlp(sizes, activation, final_activation=True, sparse_input=True)  # binarized images: mostly zeros
        self.out_features = sizes[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class ConvEncoder(Encoder):
    """Convolutional encoder for images ``x [B, C, H, W]``: stride-2 convolutions, then a linear layer.

    Each of the ``len(channels)`` convolutions halves H and W (kernel 4,
    padding 1), so H and W must be divisible by ``2**len(channels)`` (4 by
    default).  Output ``h [B, hidden]``.  Convolutional autoencoders: Masci et al. 2011,
    "Stacked convolutional auto-encoders for hierarchical feature extraction".

    :param channels: output channels of each stride-2 convolution.
    :param hidden: width of the linear layer after the convolutions (0: none).
    :param activation: nonlinearity after every layer.
    """

    def __init__(
        self,
        input_shape,
        *,
        channels: tuple[int, ...] = (32, 64),
        hidden: int = 256,
        activation: Activation = "relu",
    ):
        super().__init__(input_shape)
        check_positive(channels, "conv channels", "give at least one (channels=32,64)")
        check_image_shape(self.input_shape, len(channels), "conv encoder")
        c, h, w = self.input_shape
        layers: list[nn.Module] = []
        for out in channels:
            layers += [nn.Conv2d(c, out, kernel_size=4, stride=2, padding=1), make_activation(activation)]
            c, h, w = out, h // 2, w // 2
        layers[-1] = Contiguous(layers[-1])  # the flatten's NCHW copy, made before the activation (layers.Contiguous)
        layers.append(nn.Flatten())
        features = c * h * w
        if hidden > 0:
            layers += [nn.Linear(features, hidden), make_activation(activation)]
            features = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = features
        channels_last(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearEncoder(Encoder):
    """No layers of its own: ``h = flatten(x)`` ``[B, D]``, so the posterior head is the one linear map x → code.

    With ``--decoder linear`` (the default mirror), ``--prior none`` and squared error (``--likelihood
    gaussian`` with a fixed σ) this is the linear autoencoder, whose optimum spans the principal subspace
    of the data: every minimum of ``Σ‖x − W₂(W₁x + b₁) − b₂‖²`` has ``W₂``'s column space equal to the
    span of the top-d principal directions (Baldi & Hornik 1989, "Neural networks and principal component
    analysis: learning from examples without local minima", Neural Networks 2(1)), i.e. PCA up to an
    invertible d×d transform of the code.
    """

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.out_features = flat_size(self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@hookimpl
def vaekit_register_encoders(registry):
    registry.register("mlp", MLPEncoder)
    registry.register("conv", ConvEncoder)
    registry.register("linear", LinearEncoder)
