"""A run killed with SIGKILL at any moment resumes to exactly the run that was never killed.

The kills are injected, not hoped for: ``VAEKIT_TEST_KILL_AT=<label>:<n>`` makes vaekit SIGKILL itself the
n-th time it reaches ``label`` (:func:`vaekit.checkpoint.kill_point`): after a training step (``step``),
during a file's write (``writing:<file>``, its temporary cut to half) or right after its rename
(``wrote:<file>``).  One run directory is killed at 11 moments in a row, each ``vaekit run --resume``
picking up what the last kill left, and must end with the weights and metrics (timing aside) of an
uninterrupted run.  The runs are ``vaekit run`` commands forked from one interpreter that imported
vaekit (and nothing else ran torch in it), so 13 runs do not each pay torch's import.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vaekit
from vaekit import checkpoint
from vaekit.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

# digits: 1438 training samples, batch 256: 6 steps an epoch, 24 in all; --checkpoint-every 2 commits
# at steps 2, 4, 6 (epoch 1's end), 8, 10, 12 (epoch 2's end), ...
ARGS = ["--data", "digits", "--encoder", "mlp:hidden=32", "--latent-dim", "4", "--epochs", "4", "--batch-size", "256",
        "--no-figures", "-q"]

# kill points in the order the chain meets them; the count is per process (a resumed run counts afresh,
# its own rewrites of model.safetensors and metrics.jsonl on resume included)
CHAIN = [
    "step:3",                                # mid-epoch, a step after the last checkpoint (step 2)
    "writing:trainer_state.safetensors:1",   # during a checkpoint's write (step 4): step 2 stays
    "wrote:trainer_state.safetensors:2",     # between the halves of epoch 1's commit: model and metrics stale
    "wrote:trainer_state.safetensors:1",     # between the halves of a mid-epoch commit (step 8)
    "wrote:model.safetensors:3",             # epoch 2's commit: after the model, before its metrics line
    "wrote:metrics.jsonl:1",                 # right after resume rewrote metrics.jsonl, before any step
    "step:1",                                # the first step after a resume
    "writing:model.safetensors:2",           # during model.safetensors' write (step 16, mid-epoch)
    "writing:metrics.jsonl:2",               # during epoch 3's metrics line
    "writing:trainer_state.safetensors:3",   # during the last epoch's commit (step 24): step 22 stays
    "wrote:metrics.jsonl:2",                 # after the last metrics line, before the run exits
]

# the zygote: imports vaekit once, then forks one `vaekit run` per entry of argv[1] with its kill point;
# after each it records the exit (-9: killed) and what the run dir holds: the committed checkpoint's
# epoch/step/position, model.safetensors' and the epochs in metrics.jsonl
ZYGOTE = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import sklearn.datasets  # noqa: F401
from vaekit.cli import build_app
import vaekit.training  # noqa: F401

def stamp(path):
    try:
        data = open(path, "rb").read()
    except OSError:
        return None
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    return [int(meta[k]) for k in ("epoch", "step", "position")]

def epochs(path):
    try:
        return [json.loads(line)["epoch"] for line in open(path)]
    except (OSError, ValueError):
        return None

report = []
for kill, args in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.environ.pop("VAEKIT_TEST_KILL_AT", None)
        if kill:
            os.environ["VAEKIT_TEST_KILL_AT"] = kill
        try:
            build_app()(args=args, prog_name="vaekit")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out = args[args.index("--out" if "--out" in args else "--resume") + 1]
    report.append({"exit": -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status),
                   "state": stamp(os.path.join(out, "trainer_state.safetensors")),
                   "model": stamp(os.path.join(out, "model.safetensors")),
                   "metrics": epochs(os.path.join(out, "metrics.jsonl")),
                   "tmp": sorted(f for f in os.listdir(out) if f.endswith(".tmp"))})
print(json.dumps(report))
"""

TIMING = {"samples_per_s", "epoch_seconds"}


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_at_every_moment_of_a_checkpoint_resumes_bit_identically(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    runs = [[None, ["run", *ARGS, "--out", str(full)]],  # uninterrupted, and without mid-epoch checkpoints
            [CHAIN[0], ["run", *ARGS, "--checkpoint-every", "2", "--out", str(part)]]]
    runs += [[kill, ["run", "--resume", str(part)]] for kill in CHAIN[1:]] + [[None, ["run", "--resume", str(part)]]]
    env = {"PYTHONPATH": str(ROOT), "VAEKIT_DISABLE_CPP_KERNEL": "1", "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", ZYGOTE, json.dumps(runs)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert [r["exit"] for r in report] == [0] + [-9] * len(CHAIN) + [0], done.stderr[-3000:]
    killed = report[1:-1]
    # the kills hit the moments they name: a commit interrupted before model.safetensors (or the
    # metrics line) caught up with it, mid-epoch checkpoints, half-written temporaries
    # seen: states [0,2,2] [0,2,2] [1,6,0] [1,8,2] [2,12,0] [2,12,0] [2,12,0] [2,16,4] [3,18,0] [3,22,4] [4,24,0]
    assert [r["state"] for r in killed] == [[0, 2, 2], [0, 2, 2], [1, 6, 0], [1, 8, 2], [2, 12, 0], [2, 12, 0],
                                           [2, 12, 0], [2, 16, 4], [3, 18, 0], [3, 22, 4], [4, 24, 0]]
    assert sum(r["model"] != r["state"] for r in killed) == 3  # model.safetensors stale after 3 kills
    assert sum(r["metrics"] != list(range(1, r["state"][0] + 1)) for r in killed) == 4  # metrics line missing
    assert sum(bool(r["tmp"]) for r in killed) == 4  # a half-written temporary left by each writing: kill
    final = report[-1]
    assert final["tmp"] == [] and final["state"] == final["model"] == [4, 24, 0] and final["metrics"] == [1, 2, 3, 4]
    # bit-identical to the uninterrupted run: every weight, every metric but the timing
    w_full, w_part = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert set(w_full) == set(w_part) and all(torch.equal(w_full[k], w_part[k]) for k in w_full)
    assert _metrics(part) == _metrics(full)


# --- a checkpoint is verified when it is loaded -------------------------------------------------

@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    vaekit.train(data="digits", encoder="mlp:hidden=16", latent_dim=2, epochs=2, batch_size=512, out=str(out),
                 quiet=True, figures=False)
    return out


def _edit_state(run: Path, tensors=None, meta=None) -> None:
    """Rewrite ``run``'s trainer_state.safetensors with some tensors or metadata entries changed."""
    from safetensors import safe_open

    path = run / checkpoint.STATE
    with safe_open(path, "pt") as f:
        old_meta = f.metadata()
    new = {**load_file(path), **(tensors or {})}
    save_file({k: v for k, v in new.items() if v is not None},
              path, {k: v for k, v in {**old_meta, **(meta or {})}.items() if v is not None})


def _optim(run: Path, change) -> dict:
    from safetensors import safe_open

    with safe_open(run / checkpoint.STATE, "pt") as f:
        info = json.loads(f.metadata()["optim.model"])
    change(info)
    return {"optim.model": json.dumps(info)}


def _string_lr(info):
    info["param_groups"][0]["lr"] = "0.001"


def _one_beta(info):
    info["param_groups"][0]["betas"] = [0.9]


EDITS = {
    "epoch -5": (lambda run: dict(meta={"epoch": "-5"}), r"epoch is -5, not a whole number >= 0"),
    "epoch 7 of 2": (lambda run: dict(meta={"epoch": "7"}), r"at epoch 7 but its metrics hold epochs \[1, 2\]"),
    "step 1000": (lambda run: dict(meta={"step": "1000"}), r"step 1000 does not follow from epoch 2"),
    "string lr": (lambda run: dict(meta=_optim(run, _string_lr)), r"setting lr is '0.001', not a float"),
    "one beta": (lambda run: dict(meta=_optim(run, _one_beta)), r"setting betas is \[0.9\], not a tuple"),
    "mis-shaped Adam moment": (lambda run: dict(tensors={"optim.model.state.0.exp_avg": torch.zeros(3, 5)}),
                               r"optim.model.state.0.exp_avg has shape \[3, 5\] but its parameter \[\d+, \d+\]"),
    "mis-shaped weight": (lambda run: dict(tensors={next(k for k in load_file(run / checkpoint.STATE)
                                                         if k.startswith("model.") and k.endswith("weight")):
                                                    torch.zeros(2, 2)}), r"has shape \[2, 2\] in the checkpoint"),
    "older vaekit": (lambda run: dict(meta={"format": None}), r"written by an older vaekit .* cannot be resumed"),
    "not JSON metrics": (lambda run: dict(meta={"metrics": "[{"}), r"is damaged"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_or_damaged_trainer_state_is_refused_in_one_line(two_epochs, tmp_path, case):
    """Each edit gives one CheckpointError line naming what is wrong, and trains nothing."""
    run = tmp_path / "run"
    shutil.copytree(two_epochs, run)
    edit, message = EDITS[case]
    _edit_state(run, **edit(run))
    before = (run / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match=message) as e:
        vaekit.training.resume(run, epochs=3, quiet=True, figures=False)
    assert "\n" not in str(e.value)
    assert ((run / "model.safetensors").read_bytes(), (run / "metrics.jsonl").read_text()) == before


def test_a_stale_model_file_is_resolved_from_the_committed_checkpoint(two_epochs, tmp_path):
    """model.safetensors behind the checkpoint (a kill between the commit and its rewrite) is never what
    loads: load_run reads the checkpoint's weights, and a resume rewrites the file from them."""
    run = tmp_path / "run"
    shutil.copytree(two_epochs, run)
    committed = {k[len("model."):]: v for k, v in load_file(run / checkpoint.STATE).items() if k.startswith("model.")}
    stale = {k: v + 1 for k, v in committed.items()}
    save_file(stale, run / "model.safetensors", {"format": "vaekit", "epoch": "1", "step": "3", "position": "0"})
    loaded = vaekit.load_run(run).state_dict()
    assert all(torch.equal(loaded[k], committed[k]) for k in committed)
    (run / "model.safetensors").unlink()  # a kill between the first commit and the first model file
    loaded = vaekit.load_run(run).state_dict()
    assert all(torch.equal(loaded[k], committed[k]) for k in committed)
    (run / "metrics.jsonl").write_text("")  # a lost metrics file comes back from the checkpoint too
    vaekit.training.resume(run, quiet=True, figures=False)  # nothing left to train: it only repairs
    assert all(torch.equal(v, committed[k]) for k, v in load_file(run / "model.safetensors").items())
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]


def test_runs_of_an_older_vaekit_still_load(two_epochs, tmp_path):
    """A run dir with config.json and model.safetensors alone (or an old trainer state beside it) loads
    its model.safetensors for eval/sample/export; only resuming it is refused (EDITS, "older vaekit")."""
    run = tmp_path / "run"
    shutil.copytree(two_epochs, run)
    expected = load_file(run / "model.safetensors")
    _edit_state(run, meta={"format": None})
    (run / "model.safetensors").write_bytes((two_epochs / "model.safetensors").read_bytes())
    for keep in ("old trainer state", "weights alone"):
        if keep == "weights alone":
            (run / checkpoint.STATE).unlink()
            (run / "metrics.jsonl").unlink()
        loaded = vaekit.load_run(run).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in expected.items()), keep
    assert not checkpoint.has_checkpoint(run)


class _Interrupt(vaekit.Regularizer):
    """Ctrl-C once after global step ``at``; counts each sample's visits as its training state."""

    name = "interrupt"
    fired = False

    def __init__(self, latent_dim, data_shape, *, at: int = 0, weight: float = 1.0):
        super().__init__(latent_dim, data_shape, weight)
        self.at, self.visits = at, torch.empty(0)

    def on_fit_start(self, trainer):
        if len(self.visits) == 0:
            self.visits = torch.zeros(len(trainer.train_x))

    def on_step_end(self, trainer, record):
        self.visits[record.index] += 1
        if trainer.step == self.at and not _Interrupt.fired:
            _Interrupt.fired = True
            raise KeyboardInterrupt

    def training_state(self):
        return {"visits": self.visits}

    def load_training_state(self, tensors):
        self.visits = tensors["visits"]


class _InterruptPlugin:
    @vaekit.hookimpl
    def vaekit_register_regularizers(self, registry):
        registry.register("interrupt", _Interrupt)


def test_checkpoint_every_resumes_mid_epoch_with_regularizer_state_and_optimizers(tmp_path):
    """Interrupted 2 batches into epoch 2 (checkpointed 1 batch in), a run with an adversarial
    regularizer (its own optimizer) and per-sample training state resumes at the exact batch: every
    weight, every visit count and every metric but the timing equal the uninterrupted run's."""
    from vaekit.manager import PluginManager

    pm = PluginManager(extra_plugins=[_InterruptPlugin()], autoload=False)
    # 1438 digits, batch 512: 3 steps an epoch; checkpoints at steps 2, 3 (epoch end), 4, 6 (end), ...
    args = dict(data="digits", encoder="mlp:hidden=16", prior="none", latent_dim=2, batch_size=512, epochs=3,
                regularizers=["adversarial:width=8", "interrupt:at=5"], quiet=True, figures=False, pm=pm)
    _Interrupt.fired = True  # the uninterrupted run
    full = vaekit.train(out=str(tmp_path / "full"), **args)
    _Interrupt.fired = False
    with pytest.raises(KeyboardInterrupt):
        vaekit.train(out=str(tmp_path / "part"), checkpoint_every=2, **args)
    resumed = vaekit.training.resume(tmp_path / "part", quiet=True, figures=False, pm=pm)
    assert torch.equal(resumed.model.regularizers[1].visits, torch.full((1438,), 3.0))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics(tmp_path / "part") == _metrics(tmp_path / "full")
