"""--precision (autocast + gradient scaler) and exact resume on every device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import vaekit
from vaekit.config import RunConfig
from vaekit.training import Trainer

from conftest import SMALL_MNIST

FAST = dict(data=SMALL_MNIST, encoder="mlp:hidden=64", latent_dim=4, batch_size=50, quiet=True, figures=False)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _weights(run):
    return load_file(run.run_dir / "model.safetensors")


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class _OutputDtypes:
    """Records the dtypes of every nn.Linear output while it is active (a global forward hook)."""

    def __enter__(self):
        self.seen = set()
        self.handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, i, o: self.seen.add(o.dtype) if isinstance(m, torch.nn.Linear) else None)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_bf16_trains_under_autocast_and_resumes_exactly_on_the_cpu(tmp_path):
    with _OutputDtypes() as dtypes:
        full = vaekit.train(epochs=2, precision="bf16", out=str(tmp_path / "full"), **FAST)
    assert torch.bfloat16 in dtypes.seen  # the layers really ran in bfloat16
    info = json.loads((full.run_dir / "config.json").read_text())
    assert info["config"]["precision"] == "bf16"
    vaekit.train(epochs=1, precision="bf16", out=str(tmp_path / "part"), **FAST)
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    assert _same(_weights(full), _weights(resumed))  # resume honours bf16 from config.json
    fp32 = vaekit.train(epochs=2, out=str(tmp_path / "fp32"), **FAST)
    assert not _same(_weights(full), _weights(fp32))
    assert full.metrics["test_elbo"] == pytest.approx(fp32.metrics["test_elbo"], rel=0.05)  # learns as fp32 does
    assert full.history[1]["test_elbo"] > full.history[0]["test_elbo"] + 20  # nats


def test_fp16_uses_a_gradient_scaler_whose_state_is_checkpointed_and_restored(tmp_path):
    full = vaekit.train(epochs=2, precision="fp16", out=str(tmp_path / "full"), **FAST)
    assert torch.isfinite(torch.tensor(full.metrics["test_elbo"]))
    with safe_open(full.run_dir / "trainer_state.safetensors", "pt") as f:
        scaler = json.loads(f.metadata()["scaler"])
    # the scaler ran: float16 gradients overflowed at 2^16, it skipped those steps and backed off by halves
    skipped = 16 - torch.log2(torch.tensor(scaler["scale"])).item()
    assert skipped >= 1 and skipped == int(skipped) and 0 < scaler["_growth_tracker"] <= full.metrics["step"]
    vaekit.train(epochs=1, precision="fp16", out=str(tmp_path / "part"), **FAST)
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    assert _same(_weights(full), _weights(resumed))
    with safe_open(resumed.run_dir / "trainer_state.safetensors", "pt") as f:
        assert json.loads(f.metadata()["scaler"]) == scaler  # restored, not restarted, on resume


def test_precision_is_validated_and_fixed_on_resume(tmp_path):
    from typer.testing import CliRunner

    from vaekit.cli import build_app

    with pytest.raises(vaekit.ConfigError, match="precision"):
        RunConfig(precision="fp8")
    runner = CliRunner()
    out = tmp_path / "r"
    ok = runner.invoke(build_app(), ["run", "--data", SMALL_MNIST, "--encoder", "mlp:hidden=32", "--epochs", "1",
                                     "--precision", "bf16", "--out", str(out), "--quiet"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(build_app(), ["run", "--resume", str(out), "--epochs", "2", "--precision", "fp32"])
    assert bad.exit_code == 1 and "only --epochs may change (got --precision)" in bad.output


def test_checkpoint_holds_every_random_stream(tmp_path):
    run = vaekit.train(epochs=1, out=str(tmp_path / "r"), **FAST)
    with safe_open(run.run_dir / "trainer_state.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"rng.torch", "rng.generator"} <= names
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        assert "rng.cuda.0" in names


@cuda
def test_cuda_resume_is_exact_and_warm_up_leaves_the_cuda_stream_alone(tmp_path):
    full = vaekit.train(epochs=2, device="cuda", out=str(tmp_path / "full"), **FAST)
    vaekit.train(epochs=1, device="cuda", out=str(tmp_path / "part"), **FAST)
    torch.cuda.manual_seed_all(12345)  # a resumed process starts with another CUDA stream
    resumed = vaekit.training.resume(tmp_path / "part", epochs=2, quiet=True, figures=False)
    assert _same(_weights(full), _weights(resumed))
    t = Trainer(RunConfig(**{**FAST, "device": "cuda", "out": str(tmp_path / "w")}), quiet=True)
    t.setup()
    before = torch.cuda.get_rng_state()
    t._warm_up()
    assert torch.equal(before, torch.cuda.get_rng_state())


@cuda
def test_bf16_and_fp16_train_on_cuda(tmp_path):
    for precision in ("bf16", "fp16"):
        run = vaekit.train(epochs=1, device="cuda", precision=precision, out=str(tmp_path / precision), **FAST)
        assert torch.isfinite(torch.tensor(run.metrics["test_elbo"]))


def test_cuda_generator_states_round_trip_through_the_checkpoint(tmp_path, monkeypatch):
    """Without a GPU, the CUDA RNG calls are stood in for: every device's state is written as
    rng.cuda.<i> and handed back to the same device on load."""
    from vaekit import checkpoint

    states = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3, 4], dtype=torch.uint8)]
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.__setitem__(index, state))
    gen = torch.Generator().manual_seed(5)
    records = [{"epoch": e} for e in (1, 2, 3)]
    checkpoint.save_checkpoint(tmp_path, checkpoint.Checkpoint(3, 30, metrics=records), torch.nn.Module(), {}, gen)
    gen.manual_seed(6)
    ckpt = checkpoint.load_checkpoint(tmp_path, torch.nn.Module(), {}, gen)
    assert (ckpt.epoch, ckpt.step, ckpt.metrics) == (3, 30, records)
    assert torch.equal(restored[0], states[0]) and torch.equal(restored[1], states[1])
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(5).get_state())


@cuda
def test_samples_png_of_a_cuda_model_equals_the_cpu_draw(trained_run, tmp_path, monkeypatch):
    from vaekit import viz

    model = vaekit.load_run(trained_run)
    with torch.no_grad():
        expected = model.sample(16, torch.Generator().manual_seed(0))
    shown = []
    monkeypatch.setattr(viz, "save_grid", lambda x, path, **kw: shown.append(x) or True)
    viz.plot_samples(model.cuda(), tmp_path / "samples.png", n=16, seed=0)
    assert torch.allclose(shown[0].cpu(), expected, atol=1e-5)
