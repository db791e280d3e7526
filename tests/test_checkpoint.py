import json
import math
import shutil
from pathlib import Path

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


# bytes per element of the safetensors dtype names
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _safetensors_layout(data: bytes) -> tuple[dict, bytes]:
    """Parse a safetensors file by its published layout, not with the safetensors library.

    https://github.com/huggingface/safetensors#format: 8 bytes little-endian unsigned header size
    N, N bytes of UTF-8 JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
    {str: str}}``, then the byte buffer the offsets index.  Returns ``(header, buffer)``.
    """
    n = int.from_bytes(data[:8], "little")
    assert 2 <= n <= len(data) - 8, f"header size {n} does not fit a file of {len(data)} bytes"
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    return header, data[8 + n :]


def test_checkpoint_files_are_safetensors_and_json_not_pickles(trained_run):
    weights = vaekit.load_run(trained_run).state_dict()
    for name in ("model.safetensors", "trainer_state.safetensors"):
        data = (trained_run / name).read_bytes()
        assert not data.startswith(b"PK"), f"{name} is a zip archive (torch.save)"
        assert not data.startswith(b"\x80"), f"{name} is a pickle"
        header, buffer = _safetensors_layout(data)
        assert all(isinstance(v, str) for v in header.pop("__metadata__", {}).values())
        assert header, f"{name} holds no tensors"
        spans = []
        for tensor, entry in header.items():
            assert set(entry) == {"dtype", "shape", "data_offsets"}, (name, tensor, entry)
            begin, end = entry["data_offsets"]
            assert end - begin == math.prod(entry["shape"]) * _ITEMSIZE[entry["dtype"]], (name, tensor)
            spans.append((begin, end))
        spans.sort()
        # the tensors tile the buffer exactly: no gap, no overlap, nothing after
        assert spans[0][0] == 0 and spans[-1][1] == len(buffer)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        if name == "model.safetensors":  # every weight of the model, byte for byte
            assert set(header) == set(weights)
            for tensor, entry in header.items():
                begin, end = entry["data_offsets"]
                raw = torch.frombuffer(bytearray(buffer[begin:end]), dtype=weights[tensor].dtype)
                assert torch.equal(raw.view(entry["shape"]), weights[tensor]), tensor
    json.loads((trained_run / "config.json").read_text())


def _touch(path):
    """What unpickling a :class:`_Tripwire` runs."""
    Path(path).touch()


class _Tripwire:
    """Pickles to a call of :func:`_touch`: if anything unpickles the file, the marker file appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _touch, (self.marker,)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_a_torch_save_file_for_the_weights_is_refused_without_unpickling(trained_run, tmp_path, zip_format):
    run = _copy(trained_run, tmp_path)
    marker = tmp_path / "unpickled"
    weights = vaekit.load_run(trained_run).state_dict()
    torch.save({**weights, "tripwire": _Tripwire(marker)}, run / "model.safetensors",
               _use_new_zipfile_serialization=zip_format)
    assert (run / "model.safetensors").read_bytes()[:2] == (b"PK" if zip_format else b"\x80\x02")
    with pytest.raises(CheckpointError) as refused:
        vaekit.load_run(run)
    assert not marker.exists(), "load_run unpickled the file"
    assert "corrupt or truncated" in str(refused.value)


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
    else:  # both copies of the weights: model.safetensors alone comes back from the checkpoint
        (run / "model.safetensors").unlink()
        (run / "trainer_state.safetensors").unlink()
    with pytest.raises(CheckpointError):
        vaekit.load_run(run)


def test_format_1_sparse_code_runs_are_refused_everywhere_else_load(tmp_path):
    """Format 2 decodes a sparse AE's code through a sigmoid; a format-1 run with sparsity on the code was trained on
    raw codes: loading, resuming or --init from it is one error saying to retrain; other format-1 runs load as before."""
    kw = dict(data="mnist:train_per_class=5,test_per_class=2", encoder="mlp:hidden=16", prior="none", latent_dim=3,
              epochs=1, quiet=True, figures=False)
    runs = {name: vaekit.train(regularizers=regs, out=str(tmp_path / name), **dict(kw, **extra)).run_dir
            for name, regs, extra in (("code", ["sparsity"], {}), ("plain", [], {}),
                                      ("features", ["sparsity:target=features"],
                                       {"encoder": "mlp:hidden=16,activation=sigmoid"}))}
    assert json.loads((runs["code"] / "config.json").read_text())["format"] == "vaekit-run/2"
    x = torch.rand(4, 1, 28, 28)
    before = {name: vaekit.load_run(run).reconstruct(x) for name, run in runs.items()}
    for run in runs.values():  # written by the previous vaekit, by hand
        info = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps(dict(info, format="vaekit-run/1")))
    message = "was trained when sparse codes were raw .*retrain it"
    with pytest.raises(CheckpointError, match=message):
        vaekit.load_run(runs["code"])
    with pytest.raises(CheckpointError, match=message):
        vaekit.training.resume(runs["code"], epochs=2, quiet=True, figures=False)
    with pytest.raises(CheckpointError, match=message):
        vaekit.train(init=str(runs["code"]), out=str(tmp_path / "init"), **kw)
    for name in ("plain", "features"):  # their decoders read what they always read
        assert torch.equal(vaekit.load_run(runs[name]).reconstruct(x), before[name])
    vaekit.train(init=str(runs["plain"]), out=str(tmp_path / "init-plain"), **kw)


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


def test_a_failed_write_is_one_output_error_and_leaves_nothing(tmp_path):
    """A full disk (or any OSError while writing) becomes one OutputError line; no temporary file stays
    and an older file of that name is kept."""
    import errno

    from vaekit.checkpoint import atomic_write
    from vaekit.errors import OutputError

    target = tmp_path / "model.safetensors"
    target.write_text("old")

    def full_disk(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*model.safetensors.*No space left on device"):
        atomic_write(target, full_disk)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"] and target.read_text() == "old"


def test_a_failed_flush_is_not_committed(tmp_path, monkeypatch):
    """An fsync error on the written file (EIO, a full disk reported late) is one OutputError line and the
    old file stays in place: nothing unflushed is renamed into place as committed."""
    import errno
    import os
    import stat

    from vaekit.errors import OutputError

    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    real = os.fsync

    def failing(fd):
        if stat.S_ISREG(os.fstat(fd).st_mode):  # files fail; folders flush
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", failing)
    with pytest.raises(OutputError, match="cannot write .*metrics.jsonl.*Input/output error"):
        checkpoint.write_metrics(tmp_path, [{"epoch": 1}])
    assert target.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))


def test_save_tensors_writes_tensors_that_share_memory_and_views(tmp_path):
    """Tied weights and views share memory, which safetensors refuses: save_tensors copies exactly those."""
    w = torch.randn(4, 6)
    tensors = {"w": w, "tied": w, "rows": w[1:3], "transposed": w.t(), "empty": torch.zeros(0, 3),
               "step": torch.tensor(2.0)}
    checkpoint.save_tensors(tmp_path / "t.safetensors", tensors)
    back, _ = checkpoint.load_tensors(tmp_path / "t.safetensors", "test file")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(back[name], t), name
