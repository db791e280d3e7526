"""DCN: deep clustering network (Yang et al. 2017) as a vaekit regularizer: k-means-friendly codes."""

from __future__ import annotations

import torch

from vaekit import Regularizer, StepOutput

from .dec import initial_centres, nearest
from .metrics import check_k


def online_kmeans_update(centroids: torch.Tensor, counts: torch.Tensor, z: torch.Tensor,
                         s: torch.Tensor) -> None:
    """DCN's centroid update (Yang et al. 2017, eq. 14) for codes ``z [B, d]`` assigned to clusters
    ``s [B]``, in place: each sample in turn does ``c_j ← c_j + 1``, ``m_j ← m_j − (1/c_j)(m_j − z_i)``,
    i.e. ``m_j`` stays the running mean of the codes assigned to j (counted by ``counts [k]``).  The
    per-cluster sums give the same result as the sequential updates, in one step."""
    k = centroids.shape[0]
    n = torch.bincount(s, minlength=k).to(counts.dtype)
    sums = torch.zeros_like(centroids).index_add_(0, s, z.to(centroids.dtype))
    new = counts + n
    hit = n > 0
    centroids[hit] = (counts[hit, None] * centroids[hit] + sums[hit]) / new[hit, None]
    counts.copy_(new)


class DCN(Regularizer):
    """Deep clustering network (Yang et al. 2017): ``recon + λ/2 ‖z_i − M s_i‖²`` with k-means in the loop.

    Penalty per batch: ``½ mean_B ‖z_i − m_{s_i}‖²`` (``weight`` = λ), ``s_i`` the sample's cluster from
    its last assignment, held fixed during the network step.  After each step (Algorithm 1): the
    batch's assignments ``s_i = argmin_j ‖z_i − m_j‖`` from the updated network's codes, then the online
    k-means centroid update with per-cluster counts (:func:`online_kmeans_update`).  Centroids
    ``M [k, d]`` and counts ``[k]`` are buffers (saved in checkpoints); they start at k-means
    (scikit-learn, n_init = 20, the run's seed) on the initial codes, counts at the cluster sizes.  The
    per-sample assignments are training state (saved with the trainer state), so a resume is exact.

    :param k: number of clusters (>= 2, at most the number of training samples).
    :param weight: λ (the penalty is λ/2 ‖z − Ms‖²).

    Raises ConfigError for k < 2 and (at the fit start) DataError for k larger than the number of
    training samples.
    """

    name = "dcn"
    supports_distributed = False  # per-sample state indexed by record.index

    def __init__(self, latent_dim, data_shape, *, k: int = 10, weight: float = 1.0) -> None:
        super().__init__(latent_dim, data_shape, weight)
        self.k = check_k(k, what=f"{self.name}: k")
        self.register_buffer("centroids", torch.zeros(self.k, self.latent_dim))
        self.register_buffer("counts", torch.zeros(self.k))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.assignments = torch.empty(0, dtype=torch.long)  # s_i [N], training state

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """The hard cluster of codes ``z [N, d]`` (``model.embed`` features): the nearest centroid, ``[N]`` int64."""
        return nearest(z, self.centroids)

    def on_fit_start(self, trainer) -> None:
        """Centroids, counts and assignments from k-means on the initial codes (not again when resuming)."""
        if bool(self.initialized):
            self.assignments = self.assignments.to(self.centroids.device)  # resumed: training state on the CPU
            return
        centres, labels = initial_centres(trainer, self.k, self.name)
        self.centroids.copy_(centres)
        self.counts.copy_(torch.bincount(labels, minlength=self.k).to(self.counts.dtype))
        self.assignments = labels
        self.initialized.fill_(True)

    def penalty(self, record: StepOutput) -> torch.Tensor | None:
        """``½ mean_B ‖z_i − m_{s_i}‖²``; None outside training steps (no ``record.index``)."""
        if record.index is None or len(self.assignments) == 0:
            return None
        n = len(record.index)
        s = self.assignments.to(record.z.device)[record.index].repeat(record.z.shape[0] // n)
        return 0.5 * (record.z - self.centroids[s]).pow(2).sum(1).mean()

    @torch.no_grad()
    def on_step_end(self, trainer, record: StepOutput) -> None:
        """Assignment update, then centroid update, on the batch's codes under the updated network."""
        if record.index is None:
            return
        from . import codes

        n = len(record.index)
        z = codes(trainer.model, record.x[:n], None if record.c is None else record.c[:n], batch_size=n)
        z = z.to(self.centroids.device)
        s = nearest(z, self.centroids)
        self.assignments[record.index.to(self.assignments.device)] = s.to(self.assignments.device)
        online_kmeans_update(self.centroids, self.counts, z, s)

    def training_state(self) -> dict[str, torch.Tensor]:
        return {"assignments": self.assignments}

    def load_training_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.assignments = tensors["assignments"]
