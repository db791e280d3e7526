"""Pretraining before training (``--pretrain``): greedy layer-wise pretraining of a stacked autoencoder.

A pretraining method is a small piece the trainer runs once, after the model is built and before
the fit-start hooks (so a clustering regularizer that initializes its centroids there sees the
pretrained codes) and the end-to-end training epochs.  Methods live in :data:`PRETRAINING`, a
:class:`~vaekit.registry.Registry` of their own (``--pretrain NAME:key=value,...``, options typed
and documented like a plugin's).  A resumed run skips pretraining: its checkpoint already holds
the fine-tuned weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .errors import ConfigError, TrainingError
from .precision import MixedPrecision
from .registry import PluginSpec, Registry
from .running import SYNC_EVERY, RunningTerms

if TYPE_CHECKING:  # pragma: no cover
    from .model import VAEModel
    from .training import Trainer

Layer = tuple[nn.Linear, list[nn.Module]]  # a Linear layer and the parameter-free modules after it


def linear_chain(module: nn.Module, x: torch.Tensor) -> list[Layer] | None:
    """``module``'s computation as a chain of ``nn.Linear`` layers, each followed by parameter-free
    modules (activations), applied to ``x.flatten(1)``; None if it is not one.

    The chain is read from the leaf modules in registration order and accepted only if it
    reproduces ``module(x)`` (flattened) on the sample ``x [B, ...]`` (so residual connections, a
    reordered ``forward`` or a convolution are refused, whatever the modules are called).  A module
    without leaves that returns ``x.flatten(1)`` (the ``linear`` encoder) is the empty chain.
    """
    leaves = [m for name, m in module.named_modules() if name and next(m.children(), None) is None]
    layers: list[Layer] = []
    for m in leaves:
        if isinstance(m, nn.Linear):
            layers.append((m, []))
        elif next(m.parameters(recurse=False), None) is not None or not layers:
            return None  # a layer with weights that is not Linear, or something before the first Linear
        else:
            layers[-1][1].append(m)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(x).flatten(1)
            y = x.flatten(1)
            for linear, after in layers:
                y = linear(y)
                for m in after:
                    y = m(y)
    except RuntimeError:
        return None
    finally:
        module.train(was_training)
    if y.shape != expected.shape or not torch.allclose(y, expected, rtol=1e-4, atol=1e-5):
        return None
    return layers


@dataclass
class _Stage:
    """One shallow autoencoder of the stack: ``encode`` (the model's own layer i, trained in place)
    and a fresh ``decoder_layer`` (+ ``decoder_act``) reconstructing the stage's input."""

    encode: Callable[[torch.Tensor], torch.Tensor]
    params: list[nn.Parameter]
    decoder_layer: nn.Linear
    decoder_act: nn.Sequential

    def reconstruct(self, inp: torch.Tensor) -> torch.Tensor:
        return self.decoder_act(self.decoder_layer(self.encode(inp)))


class Layerwise:
    """Greedy layer-wise pretraining of a stacked (denoising) autoencoder, then end-to-end fine-tuning.

    For an encoder that is a chain of ``nn.Linear`` layers with activations (``mlp``, ``linear``)
    followed by the posterior head, stage i trains encoder layer i (with its activation) and a
    fresh decoder layer as a shallow autoencoder on the codes of the frozen layers below (Bengio
    et al. 2007, "Greedy layer-wise training of deep networks"; Vincent et al. 2010, "Stacked
    denoising autoencoders"; the recipe DEC starts from, Xie et al. 2016, §3.2):

    * stage 1 reconstructs the data with the run's likelihood (loss ``−log p(x | x̂)``, nats per
      sample: cross-entropy for Bernoulli, squared error for a Gaussian); its decoder layer outputs
      the decoder's layout ``[k·D]`` with no activation (the likelihood applies its link);
    * stage i > 1 reconstructs its input ``h_{i−1}`` (the codes below) with squared error
      ``Σ_j (h_{i−1,j} − ĥ_j)²`` per sample, through the activation that produced ``h_{i−1}``;
    * the last stage trains the posterior head; its code is the one the decoder reads,
      ``model.transform_latent`` of the prior's ``mean`` (the head's output for ``--prior none``, μ
      for a Gaussian VAE, whose log σ² rows keep their initialization; then a sparse AE's sigmoid or
      a k-sparse AE's top-k), so the head and the mirrored decoder's first layer are pretrained on the
      codes fine-tuning decodes; the head has no activation of its own, so without a transform the
      embedding keeps full information (as in DEC).

    With ``mask > 0`` every stage is a denoising autoencoder: a fraction ``mask`` of its input
    entries is set to 0 (masking noise, Vincent et al. 2010; DEC uses 20 %) and the clean input is
    reconstructed.  Stages draw batches as training does (the run's batch size, seeded shuffling
    and binarization).  When the decoder mirrors the encoder (its Linear layers have the stages'
    decoder layers' shapes in reverse order, as the default decoder does), its Linear layers start
    from the stages' decoder layers; otherwise only the encoder is pretrained.  Each stage epoch
    writes ``{"stage": "pretrain", "layer": i, "layers": L, "epoch": e, "train_loss": …}`` to
    ``metrics.jsonl`` (the run's history and figures keep training epochs only).

    Raises ConfigError for ``epochs < 1``, ``lr <= 0``, ``mask`` outside [0, 1), and (when the model
    is built) for an encoder that is not such a chain (a ``conv`` encoder).

    :param epochs: epochs per stage (layer).
    :param lr: Adam learning rate of the stages (default: the run's --lr).
    :param mask: masking noise of the denoising stages: the fraction of each stage's input entries set to 0 (0: none).
    """

    def __init__(self, *, epochs: int = 5, lr: float | None = None, mask: float = 0.0):
        if epochs < 1:
            raise ConfigError(f"pretraining 'layerwise': epochs must be at least 1, got {epochs}")
        if lr is not None and not lr > 0:
            raise ConfigError(f"pretraining 'layerwise': lr must be positive, got {lr}")
        if not 0.0 <= mask < 1.0:
            raise ConfigError(f"pretraining 'layerwise': mask must be in [0, 1), got {mask}")
        self.epochs = int(epochs)
        self.lr = lr
        self.mask = float(mask)
        self.stages: list[_Stage] = []
        self.mirror: list[nn.Linear] | None = None

    # --- the plan -----------------------------------------------------------------------------

    def prepare(self, model: "VAEModel", x: torch.Tensor) -> None:
        """Build the stages for ``model`` (``x``: a few training samples to check the layer chain on).

        Raises ConfigError if the encoder is not a chain of Linear layers and activations.
        """
        layers = linear_chain(model.encoder, x)
        if layers is None:
            raise ConfigError(f"--pretrain layerwise needs an encoder made of Linear layers and activations "
                              f"(e.g. mlp); {type(model.encoder).__name__} is not one")
        self._layers = layers
        out_flat = math.prod(model.decoder.output_shape)
        device = model.prior._device_anchor.device
        stages = []
        below_act: list[nn.Module] = []
        for i, (linear, after) in enumerate(layers):
            layer = nn.Sequential(linear, *after)
            stages.append(self._stage(layer, list(linear.parameters()), linear.out_features,
                                      linear.in_features if i else out_flat, below_act, device))
            below_act = after
        head, prior = model.head, model.prior
        stages.append(self._stage(lambda h: model.transform_latent(prior.mean(head(h))), list(head.parameters()), model.latent_dim,
                                  model.encoder.out_features if layers else out_flat, below_act, device))
        self.stages = stages
        z = torch.randn(x.shape[0], model.latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
        chain = linear_chain(model.decoder, z)
        wanted = [(s.decoder_layer.in_features, s.decoder_layer.out_features) for s in reversed(stages)]
        found = None if chain is None else [(lin.in_features, lin.out_features) for lin, _ in chain]
        self.mirror = [lin for lin, _ in chain] if found == wanted else None

    @staticmethod
    def _stage(encode, params, code_size: int, out_size: int, act: list[nn.Module], device) -> _Stage:
        decoder_layer = nn.Linear(code_size, out_size).to(device)
        return _Stage(encode, params, decoder_layer, nn.Sequential(*copy.deepcopy(act)).to(device))

    def _below(self, model: "VAEModel", i: int, x: torch.Tensor) -> torch.Tensor:
        """The input of stage ``i``: ``x`` through the (frozen) layers below it, ``[B, features]``."""
        y = x.flatten(1)
        for linear, after in self._layers[:i]:
            y = linear(y)
            for m in after:
                y = m(y)
        return y

    # --- running it ---------------------------------------------------------------------------

    def run(self, trainer: "Trainer") -> None:
        """Train the stages one after another, then copy the decoder layers into a mirrored decoder."""
        model, cfg = trainer.model, trainer.config
        n_layers = len(self.stages)
        what = "the encoder and the mirrored decoder" if self.mirror is not None else \
            "the encoder only (the decoder does not mirror it)"
        trainer.console.print(f"pretraining {n_layers} layers greedily, {self.epochs} epochs each, "
                              f"mask {self.mask:g}: {what}")
        lr = self.lr if self.lr is not None else cfg.lr
        amp = MixedPrecision(cfg.precision, trainer.device)  # a scaler of its own: the run's stays untouched
        steps = math.ceil(len(trainer.train) / cfg.batch_size)
        model.train()
        for i, stage in enumerate(self.stages):
            optimizer = torch.optim.Adam(stage.params + list(stage.decoder_layer.parameters()), lr=lr)
            with trainer.progress(steps, self.epochs, label=f"pretrain layer {i + 1}/{n_layers} epoch") as bar:
                for epoch in range(1, self.epochs + 1):
                    loss, seconds = self._epoch(trainer, model, i, stage, optimizer, amp, epoch, bar)
                    record = {"stage": "pretrain", "layer": i + 1, "layers": n_layers, "epoch": epoch,
                              "train_loss": loss, "epoch_seconds": seconds}
                    trainer.log_stage(record, f"pretrain layer {i + 1}/{n_layers} epoch {epoch}/{self.epochs}  "
                                              f"loss {loss:.2f}  |  {len(trainer.train) / max(seconds, 1e-9):,.0f} samples/s")
        if self.mirror is not None:
            with torch.no_grad():
                for target, stage in zip(self.mirror, reversed(self.stages)):
                    target.weight.copy_(stage.decoder_layer.weight)
                    target.bias.copy_(stage.decoder_layer.bias)

    def _epoch(self, trainer, model, i: int, stage: _Stage, optimizer, amp, epoch: int, bar) -> tuple[float, float]:
        running = RunningTerms(trainer.dist)  # the losses stay on the device between reads (vaekit.running)

        def failed(value: float, step: int) -> TrainingError:
            return TrainingError(f"the loss became {value} while pretraining layer {i + 1} (epoch {epoch}, step "
                                 f"{step}); try a lower lr (--pretrain layerwise:lr=...)")
        start = time.perf_counter()
        for step, (x, _) in enumerate(trainer.batches(), 1):
            with torch.no_grad():
                inp = self._below(model, i, x)
            noisy = inp
            if self.mask > 0:
                keep = torch.rand(inp.shape, generator=trainer.generator) >= self.mask
                noisy = inp * keep.to(inp.device, inp.dtype)
            with amp.autocast():
                out = stage.reconstruct(noisy)
                if i == 0:  # the data, in the decoder's output layout, through the run's likelihood
                    loss = -model.likelihood.log_prob(out.view((len(x),) + model.decoder.output_shape), x).mean()
                else:
                    loss = (out.float() - inp.float()).square().sum(1).mean()
            running.add(step, loss, {"loss": loss}, {}, len(x))
            optimizer.zero_grad(set_to_none=True)
            amp.step(loss, optimizer)
            if running.pending >= SYNC_EVERY:
                running.flush(failed)
                if bar is not None:
                    bar.update(epoch, running.count, time.perf_counter() - start, running.sums)
        running.flush(failed)
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.update(epoch, running.count, seconds, running.sums)
        return running.sums["loss"] / running.count, seconds


PRETRAINING = Registry("pretraining method")
PRETRAINING.owner = "builtin"
PRETRAINING.register("layerwise", Layerwise)


def build_pretraining(spec: PluginSpec | str) -> Layerwise:
    """The pretraining method ``spec`` names (``"layerwise:epochs=5,mask=0.2"``), options checked.

    Raises UnknownPluginError for an unknown method, ConfigError for a bad option.
    """
    return PRETRAINING.build(PluginSpec.parse(spec))


__all__ = ["PRETRAINING", "Layerwise", "build_pretraining", "linear_chain"]
