"""A plugin module used by the tests: one implementation of every hook."""

from __future__ import annotations

import torch
from torch import nn

import vaekit
from vaekit.data import DataBundle
from vaekit.interfaces import Regularizer
from vaekit.plugins.likelihoods import BernoulliLikelihood

CALLS: list[tuple] = []


class CodeL2(Regularizer):
    """Squared norm of the code, ‖z‖², mean over the batch.

    :param weight: multiplier of the penalty.
    """

    name = "code_l2"

    def __init__(self, latent_dim, data_shape, *, weight: float = 1.0):
        super().__init__(latent_dim, data_shape, weight)

    def penalty(self, record):
        return record.z.square().sum(1).mean()


class MeanTracker(Regularizer):
    """Owns a parameter m with its own optimizer; m tracks the batch mean of the codes (alternating steps)."""

    name = "tracker"

    def __init__(self, latent_dim, data_shape, *, weight: float = 0.0):
        super().__init__(latent_dim, data_shape, weight)
        self.m = nn.Parameter(torch.zeros(latent_dim))

    def configure_optimizer(self):
        return torch.optim.SGD([self.m], lr=0.2)

    def update(self, record, optimizer):
        optimizer.zero_grad()
        loss = (record.z.detach() - self.m).square().sum(1).mean()
        loss.backward()
        optimizer.step()
        return {"tracker_loss": loss.item()}

    def penalty(self, record):
        return (record.z - self.m).square().sum(1).mean()


class ZeroHalf(Regularizer):
    """Corrupts the input by zeroing its first half; halves the code before decoding."""

    name = "zero_half"

    def __init__(self, latent_dim, data_shape):
        super().__init__(latent_dim, data_shape)

    def corrupt(self, x):
        x = x.clone()
        x.view(x.shape[0], -1)[:, : x[0].numel() // 2] = 0
        return x

    def transform_latent(self, z):
        return z * 0.5


class BatchRecorder(Regularizer):
    """Records the clean training batches the model sees, epoch by epoch; changes nothing."""

    name = "recorder"

    def __init__(self, latent_dim, data_shape):
        super().__init__(latent_dim, data_shape, weight=0.0)
        self.batches: list[list[torch.Tensor]] = [[]]

    def on_fit_start(self, trainer):
        self.batches = [[]]

    def corrupt(self, x):
        self.batches[-1].append(x.detach().cpu().clone())
        return x

    def on_epoch_end(self, trainer, epoch):
        self.batches.append([])

    def seen(self) -> list[torch.Tensor]:
        """The training inputs of each finished epoch, ``[N, *S]`` per epoch, in the order they were drawn."""
        return [torch.cat(b) for b in self.batches if b]


class NanAfter(BernoulliLikelihood):
    """A Bernoulli likelihood that returns NaN from the given training call on.

    :param step: the first training call that returns NaN.
    """

    def __init__(self, data_shape, *, step: int = 5):
        super().__init__(data_shape)
        self.calls = 0
        self.nan_from = step

    def log_prob(self, params, x):
        lp = super().log_prob(params, x)
        if self.training:
            self.calls += 1
            if self.calls >= self.nan_from:
                return lp * float("nan")
        return lp


class Identity(vaekit.Encoder):
    """Identity features: h = flatten(x)."""

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.out_features = int(torch.tensor(self.input_shape).prod())

    def forward(self, x):
        return x.flatten(1)


class LinearDecoder(vaekit.Decoder):
    """One linear layer."""

    def __init__(self, latent_dim, output_shape):
        super().__init__(latent_dim, output_shape)
        self.lin = nn.Linear(latent_dim, int(torch.tensor(self.output_shape).prod()))

    def forward(self, z):
        return self.lin(z).view((z.shape[0],) + self.output_shape)


class FixedPrior(vaekit.Prior):
    """A deterministic prior under another name (delegates to the built-in 'none')."""

    stochastic = False

    def __init__(self, latent_dim):
        super().__init__(latent_dim)
        self.param_dim = latent_dim

    def mean(self, params):
        return params

    def rsample_kl(self, params):
        return params, params.new_zeros(params.shape[0])


class ReconOnly(vaekit.Objective):
    """Reconstruction only: the loss is mean_B −log p(x|z), the KL is not penalised (a third-party objective)."""

    name = "recon_only"

    def terms(self, model, record):
        recon = -record.log_px.mean()
        return recon, {"recon": recon}


def tiny(*, n: int = 40) -> DataBundle:
    """Random binary vectors of length 16.

    :param n: training samples.
    """
    g = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((n + 10, 16), 0.3), generator=g)
    return DataBundle("tiny", x[:n], x[n:])


def grey(*, n: int = 200) -> DataBundle:
    """``n`` copies of one grey vector of 16 pixels, grey levels 0.05 to 0.95 in equal steps (10 test copies).

    :param n: training samples.
    """
    ramp = torch.linspace(0.05, 0.95, 16)
    return DataBundle("grey", ramp.repeat(n, 1), ramp.repeat(10, 1))


@vaekit.hookimpl
def vaekit_register_encoders(registry):
    registry.register("identity", Identity)


@vaekit.hookimpl
def vaekit_register_decoders(registry):
    registry.register("affine", LinearDecoder)


@vaekit.hookimpl
def vaekit_register_priors(registry):
    registry.register("fixed", FixedPrior)


@vaekit.hookimpl
def vaekit_register_likelihoods(registry):
    registry.register("nan_after", NanAfter)


@vaekit.hookimpl
def vaekit_register_regularizers(registry):
    registry.register("code_l2", CodeL2)
    registry.register("tracker", MeanTracker)
    registry.register("zero_half", ZeroHalf)
    registry.register("recorder", BatchRecorder)


@vaekit.hookimpl
def vaekit_register_objectives(registry):
    registry.register("recon_only", ReconOnly)


@vaekit.hookimpl
def vaekit_register_datasets(registry):
    registry.register("tiny", tiny)
    registry.register("grey", grey)


@vaekit.hookimpl
def vaekit_register_commands(app):
    @app.command("hello")
    def hello(name: str = "world") -> None:
        """Say hello (a command added by a plugin)."""
        if name == "error":
            raise vaekit.ConfigError("a plugin command failed cleanly")
        print(f"hello {name}")


@vaekit.hookimpl
def vaekit_fit_start(trainer):
    CALLS.append(("fit_start", trainer.start_epoch))


@vaekit.hookimpl
def vaekit_epoch_end(trainer, epoch, metrics):
    metrics["plugin_note"] = epoch * 10
    CALLS.append(("epoch_end", epoch))


@vaekit.hookimpl
def vaekit_fit_end(trainer, metrics):
    CALLS.append(("fit_end", metrics["epoch"]))
