"""Built-in regularizers: ``sparsity`` (sparse AE), ``adversarial`` (AAE) and ``mmd`` (WAE-MMD)."""

from __future__ import annotations


from typing import Literal

import torch
import torch.nn.functional as F
from torch.distributions import Distribution

from .. import hookimpl
from ..errors import ConfigError
from ..interfaces import Regularizer, StepOutput, standard_normal
from ..ops import mmd2_unbiased
from .layers import mlp


class Sparsity(Regularizer):
    """Sparse autoencoder (Ng, "Sparse autoencoder", CS294A notes, 2011): Ω = Σ_j KL(ρ ‖ ρ̂_j).

    KL(ρ ‖ ρ̂) = ρ log(ρ/ρ̂) + (1 − ρ) log((1 − ρ)/(1 − ρ̂)), ρ̂_j the batch mean of activation j,
    an activation in (0, 1) that the decoder reads.  ``target=code``: the code is
    sigmoid(z) — ``transform_latent`` applies the sigmoid, so ``embed`` returns codes in (0, 1)
    and the decoder reads them — and ρ̂_j is the mean of code unit j.  ``target=features``: the
    encoder's features h are the activations, and they must lie in [0, 1] (a sigmoid encoder,
    ``--encoder mlp:activation=sigmoid``); the code is left as it is.  Works with over-complete codes
    (latent-dim > input dim).  With ``target=code`` it must come before any other regularizer that
    transforms the code (``--regularizer sparsity --regularizer ksparse:k=10``: sigmoid, then top-k;
    the other order is refused, since the sigmoid would turn the zeros into 0.5).  Loss: J + weight·Ω.
    The default weight 3 is Ng's β; on the bundled MNIST digits (200 code units, ρ = 0.05) it gives
    codes of mean ≈ ρ with most entries below 0.05.  Runs of format ``vaekit-run/1`` with
    ``target=code`` decoded the raw z and are refused when loaded: retrain them.

    :param rho: target mean activation ρ, in (0, 1).
    :param weight: β, the penalty's weight.
    :param target: ``code`` (sigmoid of z, what the decoder reads) or ``features`` (the encoder's output h, in [0, 1]).
    """

    name = "sparsity"
    sparse_codes = True

    def __init__(self, latent_dim, data_shape, *, rho: float = 0.05, weight: float = 3.0,
                 target: Literal["code", "features"] = "code"):
        super().__init__(latent_dim, data_shape, weight)
        if not 0.0 < rho < 1.0:
            raise ConfigError(f"sparsity: rho must be in (0, 1), got {rho}")
        self.rho = float(rho)
        self.target = target
        self.sparse_codes = target == "code"  # with target=features the features are sparse, not the code

    def bind(self, model) -> None:
        super().bind(model)
        if self.target == "features":
            _check_unit_interval(model)
            return
        before = []
        for reg in model.regularizers:
            if reg is self:
                break
            if type(reg).transform_latent is not Regularizer.transform_latent:
                before.append(reg.name)
        if before:
            raise ConfigError(f"sparsity:target=code applies a sigmoid to the code, but it comes after "
                              f"{', '.join(repr(n) for n in before)}, which transforms the code first (a sigmoid "
                              "turns top-k zeros into 0.5); list sparsity first (--regularizer sparsity before it)")

    def transform_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.target == "code":
            return torch.sigmoid(z)
        return z

    def activations(self, record: StepOutput) -> torch.Tensor:
        """The activations ``[B, units]`` in (0, 1): the code (already a sigmoid) or the features."""
        return record.z if self.target == "code" else record.h

    def penalty(self, record: StepOutput) -> torch.Tensor:
        rho_hat = self.activations(record).mean(0).clamp(1e-6, 1 - 1e-6)
        rho = self.rho
        return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


@torch.no_grad()
def _check_unit_interval(model) -> None:
    """ConfigError unless the encoder's features stay in [0, 1] on a probe of large inputs of both signs
    (which an unbounded activation such as ReLU, or a linear or tanh layer, leaves)."""
    x = 100.0 * torch.randn((16,) + tuple(model.data_shape), generator=torch.Generator().manual_seed(0))
    was_training = model.encoder.training
    try:
        h = model.encoder.eval()(x)
    except RuntimeError:  # the wrong data shape: the model's own shape check reports it
        return
    finally:
        model.encoder.train(was_training)
    if h.min() < 0 or h.max() > 1:
        raise ConfigError(
            f"sparsity:target=features needs encoder features in [0, 1] (ρ̂ is a mean activation), but this encoder "
            f"gives values in [{float(h.min()):.3g}, {float(h.max()):.3g}]; use a sigmoid encoder "
            "(--encoder mlp:activation=sigmoid) or target=code")


class _LatentMatching(Regularizer):
    """Shared part of AAE and WAE: the target distribution the codes are pushed towards."""

    def __init__(self, latent_dim, data_shape, weight: float) -> None:
        super().__init__(latent_dim, data_shape, weight)
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # follows the model's device

    def latent_target(self, like: torch.Tensor) -> Distribution:
        """The model's prior p(z) when it has one, else N(0, I)."""
        prior = getattr(self, "_prior", None)
        if prior is not None and prior.stochastic:
            return prior.distribution()
        return standard_normal(self.latent_dim, like)

    def latent_prior(self) -> Distribution:
        return self.latent_target(self._anchor)


class Adversarial(_LatentMatching):
    """Adversarial autoencoder (Makhzani et al. 2015): a discriminator on z tells prior samples from codes.

    Each step, before the model's update, the discriminator D takes one Adam step on
    ``BCE(D(z_p), 1) + BCE(D(z_q), 0)`` with ``z_p ~ p(z)`` and the batch's codes ``z_q``
    (detached); the model then minimises ``weight · BCE(D(z_q), 1)`` (the non-saturating
    generator loss) alongside its reconstruction term.  p(z) is the model's prior, or N(0, I)
    with ``--prior none``.  The discriminator and its optimizer are checkpointed and resumed.

    :param weight: weight of the generator (encoder) loss.
    :param width: hidden width of the discriminator MLP.
    :param depth: number of hidden layers of the discriminator.
    :param lr: Adam learning rate of the discriminator.
    """

    name = "adversarial"

    def __init__(self, latent_dim, data_shape, *, weight: float = 1.0, width: int = 256, depth: int = 2,
                 lr: float = 2e-4):
        super().__init__(latent_dim, data_shape, weight)
        if width < 1 or depth < 1 or lr <= 0:
            raise ConfigError(f"adversarial: width and depth must be >= 1 and lr > 0, got {width}, {depth}, {lr}")
        self.lr = float(lr)
        self.discriminator = mlp([self.latent_dim] + [width] * depth + [1], "leaky_relu", final_activation=False)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.999))

    def update(self, record: StepOutput, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        z_q = record.z.detach()
        z_p = self.latent_target(z_q).sample((z_q.shape[0],))
        real, fake = self.discriminator(z_p), self.discriminator(z_q)
        loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
            F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        accuracy = 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
        return {"adversarial_d_loss": loss.detach(), "adversarial_d_acc": accuracy.detach()}  # read with the terms

    def penalty(self, record: StepOutput) -> torch.Tensor:
        logits = self.discriminator(record.z)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))


class MMD(_LatentMatching):
    """WAE-MMD (Tolstikhin et al. 2018): unbiased MMD² between the batch's codes and as many draws from p(z).

    Kernel ``imq``: k(x, y) = C / (C + ‖x − y‖²) with C = 2·d·σ² times each of ``scales``
    (σ² = 1, the variance of the standard-normal prior; the paper sums scales
    0.1…10); ``rbf``: exp(−‖x − y‖² / C).  p(z) is the model's prior, or N(0, I) with
    ``--prior none``.  With ``--prior gaussian`` the penalty adds to the KL term; give
    ``--beta 0`` to replace it.  The default λ = 100 (the paper used 10 with a squared-error
    cost) keeps the penalty from being swamped by a reconstruction term summed over all pixels
    in nats; on the bundled MNIST digits it brings the codes' MMD² to the prior ~15× down.

    :param weight: λ, the penalty's weight.
    :param kernel: ``imq`` or ``rbf``.
    :param scales: multipliers of C = 2·d·σ² (several give a multi-scale kernel).
    """

    name = "mmd"

    def __init__(self, latent_dim, data_shape, *, weight: float = 100.0, kernel: Literal["imq", "rbf"] = "imq",
                 scales: tuple[float, ...] = (1.0,)):
        super().__init__(latent_dim, data_shape, weight)
        if not scales or any(s <= 0 for s in scales):
            raise ConfigError(f"mmd: scales must be positive, got {scales}")
        self.kernel = kernel
        self.scales = tuple(2.0 * self.latent_dim * float(s) for s in scales)

    def penalty(self, record: StepOutput) -> torch.Tensor:
        """The unbiased MMD² of the batch's codes ``z [B, d]`` against ``B`` prior draws; 0 for ``B < 2``
        (a last batch of one sample, or a torchrun rank's share of one: no unbiased estimate; a tensor
        all the same, so every rank logs the term)."""
        z = record.z
        if z.shape[0] < 2:
            return z.sum() * 0.0  # counts as 0 in the epoch's mean, as the missing term did before
        z_p = self.latent_target(z).sample((z.shape[0],))
        return mmd2_unbiased(z, z_p, self.kernel, self.scales)


@hookimpl
def vaekit_register_regularizers(registry):
    registry.register("sparsity", Sparsity)
    registry.register("adversarial", Adversarial)
    registry.register("mmd", MMD)


