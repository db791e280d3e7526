"""The core's generic support for stateful, self-stopping regularizers (clustering): ``record.index``,
``Regularizer.on_step_end``, ``training_state`` / ``load_training_state``, ``Trainer.request_stop`` and
``drops_likelihood``."""

import json

import plugin_for_tests
import pytest
import torch

import vaekit
from vaekit import ConfigError, Regularizer
from vaekit.manager import PluginManager


class Visits(Regularizer):
    """Counts the visits of each training sample (training state sized by the data), checks every
    step's ``index`` against its batch, and asks to stop after ``stop_at`` steps (0: never)."""

    name = "visits"

    def __init__(self, latent_dim, data_shape, *, stop_at: int = 0, drop: bool = False, weight: float = 1.0):
        super().__init__(latent_dim, data_shape, weight)
        self.stop_at, self.drops_likelihood = stop_at, drop
        self.visits = torch.empty(0)
        self.steps_seen: list[int] = []
        self.mismatch = False

    def on_fit_start(self, trainer):
        if len(self.visits) == 0:
            self.visits = torch.zeros(len(trainer.train_x))

    def penalty(self, record):
        return None if record.index is None else record.z.pow(2).sum(1).mean()

    def on_step_end(self, trainer, record):
        self.mismatch |= not torch.equal(record.x, trainer.train_x[record.index])
        self.visits[record.index] += 1
        self.steps_seen.append(trainer.step)
        if self.stop_at and trainer.step == self.stop_at:
            trainer.request_stop(f"visits: step {trainer.step} reached")

    def training_state(self):
        return {"visits": self.visits}

    def load_training_state(self, tensors):
        self.visits = tensors["visits"]


class Plugin:
    @vaekit.hookimpl
    def vaekit_register_regularizers(self, registry):
        registry.register("visits", Visits)


def pm():
    return PluginManager(extra_plugins=[plugin_for_tests, Plugin()], autoload=False)


RUN = dict(data="tiny", encoder="identity", decoder="affine", latent_dim=2, batch_size=16, quiet=True, figures=False)


def test_index_names_the_batch_and_on_step_end_runs_after_each_step(tmp_path):
    result = vaekit.train(**RUN, epochs=3, regularizers=["visits"], out=str(tmp_path / "r"), pm=pm())
    reg = result.model.regularizers[0]
    assert not reg.mismatch  # x == train_x[index] on every step
    assert reg.steps_seen == list(range(1, 10))  # 40 samples, batch 16: 3 steps per epoch, after each update
    assert torch.equal(reg.visits, torch.full((40,), 3.0))  # each epoch's indices are a permutation


def test_request_stop_ends_the_run_logged_and_resume_trains_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    result = vaekit.train(**{**RUN, "quiet": False}, epochs=5, regularizers=["visits:stop_at=4"], out=str(out), pm=pm())
    assert "stopped early at epoch 2/5: visits: step 4 reached" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and lines[-1]["step"] == 4
    assert lines[-1]["stopped"] == "visits: step 4 reached" and "stopped" not in lines[0]
    again = vaekit.resume(out, epochs=8, quiet=False, figures=False, pm=pm())
    assert "nothing to resume" in capsys.readouterr().err
    assert again.history == result.history


def test_training_state_survives_a_resume(tmp_path):
    full = vaekit.train(**RUN, epochs=4, regularizers=["visits"], out=str(tmp_path / "full"), pm=pm())
    vaekit.train(**RUN, epochs=2, regularizers=["visits"], out=str(tmp_path / "half"), pm=pm())
    resumed = vaekit.resume(tmp_path / "half", epochs=4, quiet=True, figures=False, pm=pm())
    assert torch.equal(resumed.model.regularizers[0].visits, torch.full((40,), 4.0))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drops_likelihood_leaves_the_reconstruction_out_of_the_loss(tmp_path):
    result = vaekit.train(**RUN, epochs=1, regularizers=["visits:drop=true"], out=str(tmp_path / "r"), pm=pm())
    m = result.history[-1]
    assert m["train_loss"] == pytest.approx(m["train_kl"] + m["train_visits"], rel=1e-5) and m["train_recon"] != pytest.approx(0)
    kept = vaekit.train(**RUN, epochs=1, regularizers=["visits"], out=str(tmp_path / "k"), pm=pm()).history[-1]
    assert kept["train_loss"] == pytest.approx(kept["train_recon"] + kept["train_kl"] + kept["train_visits"], rel=1e-5)
    with pytest.raises(ConfigError, match="drops_likelihood"):
        vaekit.train(**RUN, epochs=1, objective="iwae", prior="gaussian", regularizers=["visits:drop=true"],
                     out=str(tmp_path / "i"), pm=pm())
