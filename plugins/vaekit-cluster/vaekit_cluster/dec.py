"""DEC and IDEC: deep embedded clustering (Xie et al. 2016; Guo et al. 2017) as a vaekit regularizer.

Codes are the features ``z = model.embed(x)`` (``[N, d]``); the cluster centres ``μ [k, d]`` are
parameters of the model, trained with it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaekit import ConfigError, Regularizer, StepOutput

from .metrics import check_k, fit_kmeans


def soft_assignment(z: torch.Tensor, centroids: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """DEC's soft assignment (Xie et al. 2016, eq. 1), a Student's t kernel: ``q_ij ∝ (1 + ‖z_i − μ_j‖²/α)^(−(α+1)/2)``,
    normalised over the clusters j.  ``z [N, d]``, ``centroids [k, d]`` -> ``q [N, k]`` (rows sum to 1)."""
    d2 = squared_distances(z, centroids)
    logits = -(alpha + 1) / 2 * torch.log1p(d2 / alpha)
    return torch.softmax(logits, dim=1)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's auxiliary target (Xie et al. 2016, eq. 3): ``p_ij = (q_ij²/f_j) / Σ_j' (q_ij'²/f_j')`` with the
    soft cluster frequencies ``f_j = Σ_i q_ij`` over all N rows of ``q [N, k]`` -> ``p [N, k]``."""
    w = q.pow(2) / q.sum(0)
    return w / w.sum(1, keepdim=True)


def squared_distances(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``‖z_i − μ_j‖²`` of ``z [N, d]`` and ``centroids [k, d]`` -> ``[N, k]``, from the differences (no
    ``‖z‖² + ‖μ‖² − 2 z·μ`` expansion: that one cancels to 0 for codes near a centre in float32)."""
    return (z[:, None, :] - centroids[None, :, :]).pow(2).sum(-1)


def nearest(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of the nearest centroid (Euclidean) of each code: ``z [N, d]``, ``centroids [k, d]`` -> ``[N]`` int64."""
    return squared_distances(z, centroids).argmin(1)


def training_codes(trainer) -> torch.Tensor:
    """The codes ``model.embed(x)`` ``[N, d]`` float32 of every training sample as loaded (eval mode, no
    gradients, no random numbers drawn), on the device of the model's parameters."""
    from . import codes

    device = next(trainer.model.parameters()).device
    return codes(trainer.model, trainer.train_x, trainer.train_y).to(device)


def initial_centres(trainer, k: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (:func:`~vaekit_cluster.metrics.fit_kmeans`, the run's seed) on the initial model's
    :func:`training_codes` -> (centres ``[k, d]``, assignments ``[N]``) on the model's device.  Raises
    DataError if k exceeds the number of training samples."""
    return fit_kmeans(training_codes(trainer), k, trainer.config.seed, f"{name}: k")


class DEC(Regularizer):
    """Deep embedded clustering (Xie et al. 2016) and, with the reconstruction kept, IDEC (Guo et al. 2017).

    Penalty per batch: ``KL(P‖Q) = mean_B Σ_j p_ij log(p_ij / q_ij)`` nats, ``q`` the Student's t soft
    assignment of the batch's codes (:func:`soft_assignment`), ``p`` the batch's rows of the target
    (:func:`target_distribution`) computed over the whole training set at the last refresh and held
    fixed for ``update_interval`` steps.  The loss is ``recon + γ·KL(P‖Q)`` (IDEC, γ = ``weight``), or
    with ``recon=false`` the KL alone (DEC; :attr:`drops_likelihood`).  The centres ``μ`` (parameter
    ``centroids [k, d]``) start at k-means (scikit-learn, n_init = 20, the run's seed) of the codes of
    the initial model (after ``--init``) at the fit start.  At each refresh the fraction of training
    samples whose hard assignment changed since the last one is compared to ``tol``; below it the run
    stops early (``trainer.request_stop``, logged in metrics.jsonl as ``stopped``).

    Start from a pretrained autoencoder: ``vaekit run --init PRETRAINED_RUN --regularizer dec:k=10``.

    :param k: number of clusters (>= 2, at most the number of training samples).
    :param alpha: degrees of freedom α of the Student's t kernel (the paper: 1).
    :param update_interval: steps between refreshes of the target P (the paper: 140 on MNIST).
    :param tol: stop when fewer than this fraction of assignments change between refreshes (0: never).
    :param recon: keep the reconstruction term (IDEC; default) or drop it (DEC).  On a VAE
        (``--prior gaussian``) ``recon=false`` leaves the ELBO's KL term alone beside KL(P‖Q), which pulls
        every code to the prior (measured: ACC 0.10, one cluster, within 2 epochs): use ``recon=true``.
    :param weight: γ, the weight of KL(P‖Q) (default 0.1, IDEC's value — but IDEC's reconstruction is a squared
        error averaged over the pixels, vaekit's is in nats summed over them, so IDEC's balance needs a γ
        of the order of the number of pixels times more: with vaekit's Gaussian likelihood of σ = 0.1
        (‖x − x̂‖²/(2σ²) summed over D = 784 pixels, i.e. D/(2σ²) times the mean squared error), IDEC's
        γ = 0.1 becomes 0.1·D/(2σ²) ≈ 3920, so ``weight=4000``. Measured on the bundled MNIST (bench/README.md), test ACC: from a Bernoulli
        conv AE γ = 50 0.768, γ = 200 0.779, DEC alone (``recon=false``) 0.784; from a σ = 0.1 conv VAE
        γ = 4000 0.808 and 0.803 (seeds 0 and 1)).

    Raises ConfigError for k < 2, alpha <= 0, update_interval < 1, tol outside [0, 1), and (at the
    fit start) DataError for k larger than the number of training samples.
    """

    name = "dec"
    supports_distributed = False  # per-sample state indexed by record.index

    def __init__(self, latent_dim, data_shape, *, k: int = 10, alpha: float = 1.0, update_interval: int = 140,
                 tol: float = 0.001, recon: bool = True, weight: float = 0.1) -> None:
        super().__init__(latent_dim, data_shape, weight)
        self.k = check_k(k, what=f"{self.name}: k")
        if not (math.isfinite(alpha) and alpha > 0):
            raise ConfigError(f"dec: alpha must be a finite number > 0, got {alpha}")
        if update_interval < 1:
            raise ConfigError(f"dec: update_interval must be at least 1 step, got {update_interval}")
        if not 0 <= tol < 1:
            raise ConfigError(f"dec: tol must be a fraction in [0, 1), got {tol}")
        self.alpha, self.update_interval, self.tol = float(alpha), int(update_interval), float(tol)
        self.drops_likelihood = not recon
        self.centroids = nn.Parameter(torch.zeros(self.k, self.latent_dim))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.target = torch.empty(0, self.k)  # P [N, k], training state (not model state)
        self.assigned = torch.empty(0, dtype=torch.long)  # hard assignments [N] at the last refresh
        self.changed = float("nan")  # the fraction changed at the last refresh

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """The hard cluster of codes ``z [N, d]`` (``model.embed`` features): ``argmax_j q_ij`` = the nearest centre, ``[N]`` int64."""
        return nearest(z, self.centroids.detach())

    def soft_assign(self, z: torch.Tensor) -> torch.Tensor:
        """``Q [N, k]`` of codes ``z [N, d]`` (:func:`soft_assignment` with this run's centres and α)."""
        return soft_assignment(z, self.centroids, self.alpha)

    def on_fit_start(self, trainer) -> None:
        """Centres from k-means on the initial codes (not again when resuming), then the first target."""
        if not bool(self.initialized):
            centres, _ = initial_centres(trainer, self.k, self.name)
            with torch.no_grad():
                self.centroids.copy_(centres)
                self.initialized.fill_(True)
        if len(self.target) == 0:
            self.refresh(trainer)
        device = self.centroids.device  # a resumed run's training state comes back on the CPU
        self.target, self.assigned = self.target.to(device), self.assigned.to(device)

    @torch.no_grad()
    def refresh(self, trainer) -> float:
        """Recompute the target P over the whole training set and the hard assignments; returns the
        fraction of samples whose assignment changed since the last refresh (nan the first time)."""
        q = self.soft_assign(training_codes(trainer))
        assigned = q.argmax(1)
        changed = float((assigned != self.assigned).float().mean()) if len(self.assigned) == len(assigned) else float("nan")
        self.target, self.assigned, self.changed = target_distribution(q), assigned, changed
        return changed

    def on_step_end(self, trainer, record: StepOutput) -> None:
        if trainer.step % self.update_interval:
            return
        changed = self.refresh(trainer)
        if changed < self.tol:
            trainer.request_stop(f"dec: {changed:.2%} of the assignments changed since the last target refresh, "
                                 f"below tol={self.tol:g} (step {trainer.step})")

    def penalty(self, record: StepOutput) -> torch.Tensor | None:
        """``KL(P‖Q)`` nats, mean over the batch; None outside training steps (no ``record.index``)."""
        if record.index is None or len(self.target) == 0:
            return None
        n = len(record.index)
        p = self.target[record.index.to(self.target.device)].to(record.z.device).repeat(record.z.shape[0] // n, 1)
        log_q = torch.log(self.soft_assign(record.z.float()).clamp_min(1e-12))
        return (p * (torch.log(p.clamp_min(1e-12)) - log_q)).sum(1).mean()

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"target": self.target, "assigned": self.assigned}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.target, self.assigned = tensors["target"], tensors["assigned"]
