"""Conditioning (conditional VAE, Sohn et al. 2015): one mechanism that makes any encoder/decoder plugin conditional.

With ``--condition label`` the model learns ``q(z|x, c)`` and ``p(x|z, c)`` for a class label ``c``:
the encoder plugin reads its input with the one-hot label appended — ``[B, D] → [B, D+K]`` for vector
data, ``K`` constant one-hot planes for image data ``[B, C, H, W] → [B, C+K, H, W]`` — and the decoder
plugin reads ``[z, one-hot c]``, ``[B, d+K]`` (Sohn et al. 2015, §4.1).  The plugins are built for
those shapes (:func:`conditioned_input_shape`, ``latent_dim + K``) and wrapped in
:class:`ConditionalEncoder` / :class:`ConditionalDecoder`; no plugin is rewritten.  Unconditional
models are not wrapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

CONDITIONS = ("none", "label")
"""The values of ``RunConfig.condition`` (``--condition``)."""


def conditioned_input_shape(shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    """The input shape the encoder plugin is built for: ``(D+K,)`` for vector data ``(D,)``,
    ``(C+K, *rest)`` for ``(C, *rest)`` (K one-hot planes)."""
    return (int(shape[0]) + num_classes,) + tuple(int(s) for s in shape[1:])


def append_label(x: torch.Tensor, c: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``x [B, C, *rest]`` with the one-hot of labels ``c [B]`` (int64) appended along dim 1:
    ``[B, C+K, *rest]``, the one-hot constant over ``rest``; ``x`` may be codes ``[B, d]`` → ``[B, d+K]``."""
    onehot = F.one_hot(c, num_classes).to(x.dtype)
    for _ in range(x.dim() - 2):
        onehot = onehot.unsqueeze(-1)
    return torch.cat([x, onehot.expand([x.shape[0], num_classes] + list(x.shape[2:]))], 1)


def check_labels(c: torch.Tensor | None, num_classes: int, batch: int) -> torch.Tensor:
    """The labels ``c [B]`` as int64 for a conditional model of ``num_classes`` classes.

    Raises ConfigError if ``c`` is None, not ``[batch]`` integers, or outside ``0..num_classes-1``.
    """
    if c is None:
        raise ConfigError(f"this model is conditional (--condition label, {num_classes} classes): give the labels c "
                          "(int64 [B]), e.g. vaekit sample --label N")
    c = torch.as_tensor(c)
    if c.dtype.is_floating_point or c.dtype == torch.bool or c.dim() != 1 or len(c) != batch:
        raise ConfigError(f"the labels c must be {batch} integers (shape [{batch}]), got {c.dtype} of shape {list(c.shape)}")
    if len(c) and (int(c.min()) < 0 or int(c.max()) >= num_classes):
        bad = int(c.min()) if int(c.min()) < 0 else int(c.max())
        raise ConfigError(f"label {bad} is out of range: this model knows the labels 0..{num_classes - 1}")
    return c.long()


_UNLABELLED = ("the {part} of this conditional model (--condition label) was called without the labels c, e.g. by a "
               "plugin that encodes inputs of its own (a VampPrior's pseudo-inputs, sparsity:target=features, "
               "contractive): such a plugin does not support --condition label")


class ConditionalEncoder(nn.Module):
    """An encoder plugin built for :func:`conditioned_input_shape` made to read ``(x [B, *S], c [B])``."""

    def __init__(self, inner: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = num_classes
        self.out_features = inner.out_features
        self.input_shape = inner.input_shape

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is None:
            raise ConfigError(_UNLABELLED.format(part="encoder"))
        return self.inner(append_label(x, c, self.num_classes))


class ConditionalDecoder(nn.Module):
    """A decoder plugin built for ``latent_dim + K`` made to read ``(z [B, d], c [B])``."""

    def __init__(self, inner: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = num_classes
        self.output_shape = inner.output_shape

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if c is None:
            raise ConfigError(_UNLABELLED.format(part="decoder"))
        return self.inner(append_label(z, c, self.num_classes))
