"""Bad input of every kind is one readable line and exit code 1 (issue 13, items 7 and 8).

One table, one row per case: how to build the input, the command line, the VaekitError subclass
the case raises (seen with ``--debug``, which lets it through) and a phrase of its message.  Every
row runs through the CLI in-process (typer's CliRunner); a few also run as ``python -m vaekit`` in a
subprocess.  Each case was an "unexpected X" line, a traceback or a silent success before this
table (a one-sample test split's latent figure, NaN weights evaluated to NaN with exit 0, ...).
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vaekit.cli import build_app
from vaekit.errors import CheckpointError, ConfigError, DataError, OutputError, VaekitError

runner = CliRunner()
APP = build_app()
MODEL = ["--encoder", "mlp:hidden=16", "--latent-dim", "2"]
QUICK = ["--epochs", "1", "--no-progress", "-q", "--no-figures"]
TINY = ["--data", "digits", *MODEL, *QUICK]
OUT = "<out>"  # replaced by a fresh run directory at each invocation


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A one-epoch MLP VAE on scikit-learn's digits ([1, 8, 8]): the run the eval/sample/export rows use."""
    out = tmp_path_factory.mktemp("bad-input") / "base"
    result = runner.invoke(APP, ["run", *TINY, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# --- builders of bad input -----------------------------------------------------------------------

def _toml(text: str | bytes) -> Callable:
    def build(tmp: Path, base: Path, mp) -> list:
        path = tmp / "c.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", "-c", path, "--data", "digits", *QUICK, "--out", OUT]
    return build


def _run(*args) -> Callable:
    return lambda tmp, base, mp: ["run", *TINY, *args, "--out", OUT]


def _data(make: Callable[[Path], Path], *extra) -> Callable:
    """``vaekit run`` on the file ``make(tmp)`` writes."""
    return lambda tmp, base, mp: ["run", "--data", make(tmp), *MODEL, *QUICK, *extra, "--out", OUT]


def _on_base(command: str, *args) -> Callable:
    return lambda tmp, base, mp: [command, base, *[a(tmp) if callable(a) else a for a in args]]


def _npz(tmp: Path, **arrays) -> Path:
    np.savez(tmp / "d.npz", **arrays)
    return tmp / "d.npz"


def _npy(tmp: Path, array) -> Path:
    np.save(tmp / "d.npy", array)
    return tmp / "d.npy"


def _idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (MNIST's format) of unsigned bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(">u1").tobytes())
    return path


def _idx_with_labels(tmp: Path, n_labels: int) -> Path:
    images = _idx(tmp / "train-images-idx3-ubyte", np.random.default_rng(0).integers(0, 256, (20, 8, 8)))
    _idx(tmp / "train-labels-idx1-ubyte", np.arange(n_labels) % 10)
    return images


def _zero_dim_idx(tmp: Path) -> Path:
    path = tmp / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 0x08, 0]) + b"\x05")  # 0 dimensions: one scalar
    return path


def _edited_run(edit: Callable[[dict], object]) -> Callable:
    """A copy of the base run whose config.json is ``edit(info)`` (a dict, or the file's text)."""
    def make(tmp: Path, base: Path) -> Path:
        run = tmp / "edited"
        shutil.copytree(base, run)
        info = edit(json.loads((run / "config.json").read_text()))
        (run / "config.json").write_text(info if isinstance(info, str) else json.dumps(info))
        return run
    return make


def _set(path: str, value) -> Callable[[dict], dict]:
    def edit(info: dict) -> dict:
        keys = path.split(".")
        target = info
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
        return info
    return edit


def _nan_weights(tmp: Path, base: Path) -> Path:
    """A copy of the base run with one NaN weight (what a diverged run saved, or a bit flip)."""
    run = tmp / "nan-weights"
    shutil.copytree(base, run)
    with safe_open(base / "model.safetensors", "pt") as f:
        meta = f.metadata()
    tensors = load_file(base / "model.safetensors")
    tensors["decoder.net.0.bias"][0] = float("nan")
    save_file(tensors, run / "model.safetensors", metadata=meta)
    return run


def _on_copy(make: Callable[[Path, Path], Path], command: str, *args) -> Callable:
    return lambda tmp, base, mp: [command, make(tmp, base), *[a(tmp) if callable(a) else a for a in args]]


def _disk_full(tmp: Path, base: Path, mp) -> list:
    """The disk fills up when the first checkpoint is written."""
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr("vaekit.checkpoint.save_file", full)
    return ["run", *TINY, "--out", OUT]


def _read_only_folder(tmp: Path, base: Path, mp) -> list:
    """Writing into a read-only folder (simulated: these tests may run as root, whom chmod does not stop)."""
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    mp.setattr("vaekit.checkpoint.tempfile.mkstemp", denied)
    return ["sample", base, "-n", "4", "--out", tmp / "s.npy"]


def _out_of_memory(tmp: Path, base: Path, mp) -> list:
    """The weights do not fit in memory (what latent-dim 10⁶ with wide layers does on a small machine)."""
    def alloc(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 64000000000 bytes. Error code 12 (Cannot allocate memory)")
    mp.setattr("vaekit.model._build_model", alloc)
    return ["run", *TINY, "--out", OUT]


class Case(NamedTuple):
    id: str
    build: Callable  # (tmp_path, base run, monkeypatch) -> CLI arguments
    error: type
    phrase: str


def deep(info: dict) -> str:
    return "[" * 100_000 + "]" * 100_000


CASES = [
    # data
    Case("labels-count-npz", _data(lambda t: _npz(t, x=np.random.default_rng(0).random((20, 64)), y=np.arange(7))),
         DataError, "20 train samples but labels of shape [7]; give one label per sample"),
    Case("labels-count-idx", _data(lambda t: _idx_with_labels(t, 7)), DataError, "20 train samples but labels of shape [7]"),
    Case("idx-0-dims", _data(_zero_dim_idx), DataError, "an IDX file with 0 dimensions holds no samples"),
    Case("npy-empty-file", _data(lambda t: (t / "d.npy").write_bytes(b"") or t / "d.npy"), DataError, "cannot read"),
    Case("npy-0-samples", _data(lambda t: _npy(t, np.zeros((0, 64), np.float32))), DataError, "need at least 2 samples"),
    Case("npy-1-sample", _data(lambda t: _npy(t, np.zeros((1, 64), np.float32))), DataError, "need at least 2 samples"),
    Case("npy-complex", _data(lambda t: _npy(t, np.ones((20, 4), np.complex64))), DataError, "expected a numeric array, got dtype complex64"),
    Case("npy-strings", _data(lambda t: _npy(t, np.array([["a"] * 4] * 20))), DataError, "expected a numeric array"),
    Case("npy-inf", _data(lambda t: _npy(t, np.array([[0.1, np.inf]] * 10))), DataError, "NaN/inf"),
    Case("digits-test-fraction-nan", _run("--data", "digits:test_fraction=nan"), DataError, "test_fraction must be in (0, 1), got nan"),
    # the TOML config file
    Case("toml-not-utf8", _toml(b'epochs = 1\nout = "\xff\xfe"\n'), ConfigError, "is not UTF-8 text (byte 18): save it as UTF-8"),
    Case("toml-out-5", _toml("out = 5\n"), ConfigError, "out must be a folder path (a string), got 5"),
    Case("toml-init-3", _toml("init = 3\n"), ConfigError, "init must be a run directory path (a string), got 3"),
    Case("toml-seed-1e23", _toml("seed = 1e23\n"), ConfigError, "seed must be an integer in [0, 2**63 - 1], got 1e+23"),
    Case("toml-seed-negative", _toml("seed = -1\n"), ConfigError, "seed must be an integer in [0, 2**63 - 1], got -1"),
    Case("toml-beta-nan", _toml("beta = nan\n"), ConfigError, "beta must be a finite number >= 0, got nan"),
    Case("toml-lr-inf", _toml("lr = inf\n"), ConfigError, "lr must be a finite positive number, got inf"),
    Case("toml-epochs-1e20", _toml("epochs = 1e20\n"), ConfigError, "epochs must be at most 1,000,000, got 1e+20"),
    Case("toml-batch-size-1e20", _toml("batch_size = 1e20\n"), ConfigError, "batch-size must be at most 2,147,483,647"),
    Case("toml-latent-dim-1e9", _toml("latent_dim = 1e9\n"), ConfigError, "latent-dim must be at most 1,000,000, got 1e+09"),
    Case("toml-plugin-options-3", _toml('[encoder]\nname = "mlp"\noptions = 3\n'), ConfigError,
         "plugin 'mlp': 'options' must be a table of option = value"),
    Case("toml-run-3", _toml("run = 3\n"), ConfigError, "'run' must be a table of settings ([run]), got 3"),
    Case("toml-is-a-folder", lambda t, b, mp: ["run", "-c", t, *TINY], ConfigError, "is a folder; give a TOML file"),
    # flags
    Case("flag-seed-1e23", _run("--seed", str(10**23)), ConfigError, "seed must be an integer in [0, 2**63 - 1]"),
    Case("flag-latent-dim-1e9", _run("--latent-dim", str(10**9)), ConfigError, "latent-dim must be at most 1,000,000"),
    Case("flag-lr-inf", _run("--lr", "inf"), ConfigError, "lr must be a finite positive number, got inf"),
    Case("flag-beta-nan", _run("--beta", "nan"), ConfigError, "beta must be a finite number >= 0, got nan"),
    Case("mlp-hidden-empty", _run("--encoder", "mlp:hidden="), ConfigError,
         "mlp hidden sizes are empty: give at least one layer size (hidden=400), or use --encoder linear"),
    Case("mlp-decoder-hidden-empty", _run("--decoder", "mlp:hidden="), ConfigError, "or use --decoder linear"),
    Case("conv-channels-empty", lambda t, b, mp: ["run", "--data", "digits", "--encoder", "conv:channels=", *QUICK, "--out", OUT],
         ConfigError, "conv channels are empty"),
    Case("gaussian-sigma-inf", _run("--likelihood", "gaussian:sigma=inf", "--binarize", "none"), ConfigError,
         "sigma and min_sigma must be finite and > 0, got inf"),
    Case("model-out-of-memory", _out_of_memory, ConfigError, "the model does not fit in memory"),
    # output folders and files
    Case("disk-full", _disk_full, OutputError, "No space left on device"),
    Case("read-only-folder", _read_only_folder, OutputError, "Permission denied"),
    Case("export-out-folder", _on_base("export", "--out", lambda t: t), OutputError, "is a folder; give a file name"),
    Case("sample-out-json", _on_base("sample", "--out", lambda t: t / "x.json"), ConfigError, "--out must end in .png"),
    Case("sample-n-1e11", _on_base("sample", "-n", str(10**11), "--out", lambda t: t / "s.npy"), ConfigError, "lower -n"),
    Case("sample-nrow-negative", _on_base("sample", "--nrow", "-1", "--out", lambda t: t / "s.png"), ConfigError, "--nrow must be >= 0"),
    Case("sample-seed-negative", _on_base("sample", "--seed", "-1", "--out", lambda t: t / "s.png"), ConfigError,
         "--seed must be an integer in [0, 2**63 - 1]"),
    # eval options
    Case("eval-batch-size-0", _on_base("eval", "--batch-size", "0"), ConfigError, "--batch-size must be at least 1, got 0"),
    Case("eval-k-negative", _on_base("eval", "-k", "-5"), ConfigError, "--nll-samples must be >= 0"),
    Case("eval-seed-1e23", _on_base("eval", "--seed", str(10**23)), ConfigError, "--seed must be an integer in [0, 2**63 - 1]"),
    # a run directory's config.json and weights
    Case("config-json-shape-string", _on_copy(_edited_run(_set("data.shape", "abc")), "eval"), CheckpointError,
         'data.shape must be a list of 1 to 3 positive integers ([D] or [C, H, W]), got "abc"'),
    Case("config-json-shape-negative", _on_copy(_edited_run(_set("data.shape", [1, -8, 8])), "sample", "--out", lambda t: t / "s.png"),
         CheckpointError, "data.shape must be a list of 1 to 3 positive integers"),
    Case("config-json-config-null", _on_copy(_edited_run(_set("config", None)), "eval"), CheckpointError,
         "'config' must be an object, got null"),
    Case("config-json-data-null", _on_copy(_edited_run(_set("data", None)), "export", "--out", lambda t: t / "m.pt"),
         CheckpointError, "'data' must be an object, got null"),
    Case("config-json-deeply-nested", _on_copy(_edited_run(deep), "eval"), CheckpointError, "JSON nested too deeply to read"),
    # same number of pixels as the weights (64) but not the data's shape: the weights record the shape they were
    # trained on (model.safetensors metadata), and load_run compares config.json's with it
    Case("config-json-shape-reordered", _on_copy(_edited_run(_set("data.shape", [2, 4, 8])), "eval", "-k", "0"),
         CheckpointError, "says the data shape is [2, 4, 8], but the weights were trained on data of shape [1, 8, 8]"),
    Case("config-json-shape-reordered-sample", _on_copy(_edited_run(_set("data.shape", [1, 4, 16])), "sample", "--out",
         lambda t: t / "s.png"), CheckpointError, "says the data shape is [1, 4, 16], but the weights were trained on"),
    Case("config-json-shape-reordered-export", _on_copy(_edited_run(_set("data.shape", [64])), "export", "--out",
         lambda t: t / "m.pt"), CheckpointError, "says the data shape is [64], but the weights were trained on"),
    Case("config-json-shape-other-size", _on_copy(_edited_run(_set("data.shape", [1, 8, 9])), "eval"), CheckpointError,
         "says the data shape is [1, 8, 9]"),
    Case("nan-weights-eval", _on_copy(_nan_weights, "eval", "-k", "5"), CheckpointError, "holds NaN/inf weights (decoder.net.0.bias)"),
    Case("nan-weights-sample", _on_copy(_nan_weights, "sample", "--out", lambda t: t / "s.png"), CheckpointError, "NaN/inf weights"),
    Case("nan-weights-export", _on_copy(_nan_weights, "export", "--out", lambda t: t / "m.pt"), CheckpointError, "NaN/inf weights"),
]


def _args(case: Case, tmp: Path, base: Path, mp, n: int) -> list[str]:
    work = tmp / f"try{n}"
    work.mkdir()
    return [str(work / "run") if a == OUT else str(a) for a in case.build(work, base, mp)]


def assert_one_line(output: str, stderr: str, phrase: str) -> str:
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in output and "unexpected" not in errors[0], errors[0]
    assert phrase in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_exit_1(case: Case, base, tmp_path, monkeypatch):
    result = runner.invoke(APP, _args(case, tmp_path, base, monkeypatch, 1))
    assert result.exit_code == 1, result.output
    assert_one_line(result.output, result.stderr, case.phrase)
    # --debug lets the error through: its class is the row's
    debug = runner.invoke(APP, ["--debug", *_args(case, tmp_path, base, monkeypatch, 2)])
    assert isinstance(debug.exception, case.error) and isinstance(debug.exception, VaekitError), repr(debug.exception)


SUBPROCESS = ["toml-not-utf8", "sample-n-1e11", "nan-weights-eval"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS], ids=SUBPROCESS)
def test_bad_input_as_a_command(case: Case, base, tmp_path):
    """``python -m vaekit`` in a subprocess: exit status 1 and the same single line on stderr."""
    args = _args(case, tmp_path, base, None, 1)
    proc = subprocess.run([sys.executable, "-m", "vaekit", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert_one_line(proc.stdout + proc.stderr, proc.stderr, case.phrase)


# --- tiny data trains and draws every figure -----------------------------------------------------

def test_a_one_sample_test_split_draws_the_latent_figure(tmp_path):
    """14 samples (13 train, 1 test: the 10% holdout) with d = 16 > 2: the PCA of the latent figure has no second
    component; the figure is drawn with it at 0 instead of being skipped with a warning, by training and by
    ``vaekit plot``."""
    data = _npy(tmp_path, np.random.default_rng(0).random((14, 64)).astype(np.float32))
    out = tmp_path / "run"
    result = runner.invoke(APP, ["run", "--data", str(data), "--encoder", "mlp:hidden=16", "--latent-dim", "16",
                                 "--epochs", "1", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr, result.stderr
    assert json.loads((out / "config.json").read_text())["data"]["n_test"] == 1
    assert (out / "latent.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(APP, ["plot", str(out), "--kind", "latent", "--out", str(tmp_path / "latent.png")])
    assert again.exit_code == 0, again.output


# --- an exported module checks its input like the C++ runtime --------------------------------------

def test_exported_module_refuses_wrong_shapes_like_the_cpp_runtime(base, tmp_path):
    """The TorchScript archive raises (``torch.jit.Error`` in Python) the C++ runtime's own message (cpp_runtime/src/runtime.cpp, check_input and
    check_latent) for a flat [8, 64] batch of [1, 8, 8] images and a code of the wrong width, and still computes
    what the model computes for the right shapes."""
    from vaekit.checkpoint import load_run
    from vaekit.export import export_torchscript

    model = load_run(base)
    export_torchscript(model, tmp_path / "m.pt")
    archive = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(archive.reconstruct(x), model.reconstruct(x), atol=1e-6)
    for method, bad, message in [
        (archive.reconstruct, x.flatten(1), "wrong input shape: expected [N, 1, 8, 8], got [8, 64]"),
        (archive.encode, torch.rand(8, 1, 8, 7), "wrong input shape: expected [N, 1, 8, 8], got [8, 1, 8, 7]"),
        (archive.decode, torch.rand(8, 3), "wrong latent shape: expected [N, 2], got [8, 3]"),
        (archive.forward, torch.rand(1, 8, 8), "wrong input shape: expected [N, 1, 8, 8], got [1, 8, 8]"),
    ]:
        with pytest.raises(torch.jit.Error, match=message.replace("[", r"\[").replace("]", r"\]")):
            method(bad)
