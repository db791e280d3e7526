"""Built-in decoders: ``mlp``, ``conv`` and ``linear``."""

from __future__ import annotations

import torch
from torch import nn

from .. import hookimpl
from ..interfaces import Decoder
from .layers import (Activation, channels_last, check_image_shape, check_positive, conv_transpose, flat_size,
                     make_activation, mlp)


class MLPDecoder(Decoder):
    """Fully connected decoder ``z [B, d] -> params [B, *output_shape]``; no activation on the output.

    :param hidden: hidden layer sizes, from the code outwards.
    :param activation: nonlinearity after every hidden layer.
    """

    def __init__(
        self, latent_dim, output_shape, *, hidden: tuple[int, ...] = (400,), activation: Activation = "relu"
    ):
        super().__init__(latent_dim, output_shape)
        check_positive(hidden, "mlp hidden sizes", "give at least one layer size (hidden=400), or use --decoder linear for a linear map")
        self.net = mlp([self.latent_dim, *hidden, flat_size(self.output_shape)], activation, final_activation=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view((z.shape[0],) + self.output_shape)


class ConvDecoder(Decoder):
    """Transposed-convolution decoder ``z [B, d] -> params [B, C', H, W]``, mirror of the ``conv`` encoder.

    A linear layer maps ``z`` to a ``[channels[0], H/2^n, W/2^n]`` map; each
    transposed convolution (kernel 4, stride 2, padding 1) doubles H and W;
    the last one outputs the likelihood's ``C'`` channels, with no activation (the
    likelihood applies its link, e.g. the Bernoulli's sigmoid).

    :param channels: channels of the feature maps, from the smallest map outwards.
    :param hidden: width of a linear layer before the first map (0: none).
    :param activation: nonlinearity after every layer but the last.
    """

    def __init__(
        self,
        latent_dim,
        output_shape,
        *,
        channels: tuple[int, ...] = (64, 32),
        hidden: int = 256,
        activation: Activation = "relu",
    ):
        super().__init__(latent_dim, output_shape)
        check_positive(channels, "conv channels", "give at least one (channels=32,64)")
        check_image_shape(self.output_shape, len(channels), "conv decoder")
        c_out, h, w = self.output_shape
        n = len(channels)
        self._start = (channels[0], h // 2**n, w // 2**n)
        layers: list[nn.Module] = []
        features = self.latent_dim
        if hidden > 0:
            layers += [nn.Linear(features, hidden), make_activation(activation)]
            features = hidden
        layers += [nn.Linear(features, flat_size(self._start)), make_activation(activation), nn.Unflatten(1, self._start)]
        for i, c in enumerate(channels):
            nxt = channels[i + 1] if i + 1 < n else c_out
            layers.append(conv_transpose(c, nxt, kernel_size=4, stride=2, padding=1))
            if i + 1 < n:
                layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)
        channels_last(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class LinearDecoder(Decoder):
    """One affine map ``z [B, d] -> W z + b``, reshaped to ``[B, *output_shape]`` (``W`` is ``[k·D, d]``).

    The decoder of the linear autoencoder (``--encoder linear``): with squared error its columns
    ``W`` span the top-d principal subspace of the data (Baldi & Hornik 1989, "Neural networks and
    principal component analysis: learning from examples without local minima"); ``linear.weight``
    holds ``W``.
    """

    def __init__(self, latent_dim, output_shape):
        super().__init__(latent_dim, output_shape)
        self.linear = nn.Linear(self.latent_dim, flat_size(self.output_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z).view((z.shape[0],) + self.output_shape)


@hookimpl
def vaekit_register_decoders(registry):
    registry.register("mlp", MLPDecoder)
    registry.register("conv", ConvDecoder)
    registry.register("linear", LinearDecoder)
