import json
import shutil

import pytest
import torch

import vaekit
from vaekit import checkpoint
from vaekit.errors import CheckpointError


def test_load_run_reproduces_the_trained_model(trained_run, small_mnist):
    model = vaekit.load_run(trained_run)
    assert not model.training and model.latent_dim == 2
    again = vaekit.load_run(trained_run)
    x = small_mnist.test_x[:8]
    assert torch.equal(model.reconstruct(x), again.reconstruct(x))
    assert model.config.encoder.name == "mlp"


def test_checkpoint_files_are_safetensors_and_json_not_pickles(trained_run):
    for name in ("model.safetensors", "trainer_state.safetensors"):
        head = (trained_run / name).read_bytes()[:16]
        assert not head.startswith(b"\x80"), f"{name} looks like a pickle"
    json.loads((trained_run / "config.json").read_text())


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "model.safetensors"
    checkpoint.save_tensors(target, {"w": torch.ones(3)})
    before = target.read_bytes()

    def dies_halfway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(target, dies_halfway)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _copy(run, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(run, dst)
    return dst


def test_corrupt_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        vaekit.load_run(run)


def test_mismatched_checkpoint(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    info = json.loads((run / "config.json").read_text())
    info["config"]["latent_dim"] = 7
    (run / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="does not match its config.json.*shape"):
        vaekit.load_run(run)


@pytest.mark.parametrize("broken", ["missing-dir", "missing-config", "bad-json", "not-a-run", "missing-weights"])
def test_broken_run_directories(trained_run, tmp_path, broken):
    run = _copy(trained_run, tmp_path)
    if broken == "missing-dir":
        run = tmp_path / "nope"
    elif broken == "missing-config":
        (run / "config.json").unlink()
    elif broken == "bad-json":
        (run / "config.json").write_text("{not json")
    elif broken == "not-a-run":
        (run / "config.json").write_text("[1, 2]")
    else:
        (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError):
        vaekit.load_run(run)


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.01)
    p.sum().backward()
    opt.step()
    tensors, meta = {}, {}
    checkpoint.flatten_optimizer("optim.model", opt, tensors, meta)
    fresh = torch.optim.Adam([p], lr=0.5)
    checkpoint.unflatten_optimizer("optim.model", fresh, tensors, meta)
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in a["state"][0])
