"""The run directory has one writer and resume means what it says (issue 13, items 3-6).

A second process is refused while a run is being written (naming the writer's PID) and a SIGKILLed
writer leaves nothing locked; ``--resume D --epochs N`` records N, refuses fewer epochs than done and
every other flag whatever its value; a run that failed in epoch 1 restarts in place (bit-identical to
an uninterrupted run); ``--out`` refuses other people's folders and ``export`` a run's own files.
Checkpoints are only ever looked at through :func:`vaekit.checkpoint.has_checkpoint`.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vaekit
from vaekit import checkpoint
from vaekit.cli import build_app
from vaekit.errors import ConfigError, OutputError
from vaekit.manager import PluginManager
from vaekit.rundir import RunDirLock, RunDirLocked, check_not_run_file

ROOT = Path(__file__).resolve().parents[1]
DATA = "digits:classes=0,1"  # 289 training images of scikit-learn's 8x8 digits: an epoch is a fraction of a second
FAST = dict(data=DATA, encoder="mlp:hidden=32", latent_dim=2, batch_size=64, quiet=True, figures=False)
FLAGS = ["--data", DATA, "--encoder", "mlp:hidden=32", "--latent-dim", "2", "--batch-size", "64", "--no-progress",
         "--no-figures"]
runner = CliRunner()
APP = build_app()


def invoke(*args):
    return runner.invoke(APP, [str(a) for a in args])


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    return lines[-1]


def _env():
    """The subprocesses' environment: this process's (the same fused-op kernel, so runs split between a
    subprocess and this process stay bit-identical), with only the built-in plugins."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "VAEKIT_DISABLE_PLUGIN_AUTOLOAD": "1", "MPLBACKEND": "Agg"}


def _epochs(run_dir):
    return [json.loads(line)["epoch"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir):
    return vaekit.load_run(run_dir).state_dict()


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


class _Hook:
    """A hook plugin that calls ``action(trainer, epoch)`` at the end of each epoch (before its checkpoint)."""

    def __init__(self, action):
        self.action = action

    @vaekit.hookimpl
    def vaekit_epoch_end(self, trainer, epoch, metrics):
        self.action(trainer, epoch)


def _pm(action):
    return PluginManager(extra_plugins=[_Hook(action)], autoload=False)


# --- one writer ------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from vaekit.rundir import lock_run_dir
lock = lock_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _hold(run_dir):
    """A second process holding ``run_dir``'s lock; returns it once the lock is held."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=_env(), text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_the_dir(tmp_path):
    """While another process holds the lock, a new run, --resume and --overwrite are refused with one
    line naming that process's PID and write nothing; once the holder is SIGKILLed (no clean-up runs),
    the directory is free at once."""
    run = tmp_path / "r"
    vaekit.train(epochs=1, out=str(run), **FAST)
    before = _snapshot(run)
    holder = _hold(run)
    try:
        for args in (["run", "--resume", run, "--epochs", "2"], ["run", *FLAGS, "--out", run, "--overwrite"]):
            line = one_line_error(invoke(*args), f"is being written by process {holder.pid}; wait for it or stop it")
            assert str(run) in line
        with pytest.raises(RunDirLocked, match=f"process {holder.pid}"):
            vaekit.resume(run, epochs=2, quiet=True, figures=False)
        assert _snapshot(run) == {**before, ".lock": f"{holder.pid}\n".encode()}  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    resumed = vaekit.resume(run, epochs=2, quiet=True, figures=False)
    assert [m["epoch"] for m in resumed.history] == _epochs(run) == [1, 2]


SECOND_WRITER = [sys.executable, "-m", "vaekit", "run", "--resume", None, "--epochs", "3", "--no-progress", "--no-figures"]


def test_training_holds_the_lock_until_its_figures_are_written(tmp_path):
    """The issue's race: `vaekit run --resume D` started while D trains.  A real second process, started
    from the first run's epoch 1 and from its fit-end hook (after the figures), is refused naming this
    process, and metrics.jsonl holds each epoch once."""
    run = tmp_path / "r"
    seen = {}

    def second_writer(where):
        proc = subprocess.run([a if a is not None else str(run) for a in SECOND_WRITER], capture_output=True,
                              text=True, env=_env(), timeout=120)
        seen[where] = (proc.returncode, proc.stderr.strip().splitlines()[-1])

    class FitEnd:
        @vaekit.hookimpl
        def vaekit_fit_end(self, trainer, metrics):
            assert (run / "samples.png").is_file()  # the figures are written and the lock still held
            second_writer("fit end")

    hook = _Hook(lambda trainer, epoch: epoch == 1 and checkpoint.has_checkpoint(run) is False and second_writer("epoch 1"))
    pm = PluginManager(extra_plugins=[hook, FitEnd()], autoload=False)
    vaekit.train(epochs=2, out=str(run), pm=pm, **{**FAST, "figures": True})
    for where in ("epoch 1", "fit end"):
        rc, line = seen[where]
        assert rc == 1 and line == f"error: {str(run)!r} is being written by process {os.getpid()}; wait for it or stop it", where
    assert _epochs(run) == [1, 2]


STALLED_RUN = """
import json, sys, time
import vaekit
from vaekit.manager import PluginManager

class Stall:
    @vaekit.hookimpl
    def vaekit_epoch_end(self, trainer, epoch, metrics):
        if epoch == 3:  # epoch 3 trained, its checkpoint not yet written: a kill here is a kill mid-run
            print("stalled", flush=True)
            time.sleep(120)

vaekit.train(epochs=5, out=sys.argv[1], pm=PluginManager(extra_plugins=[Stall()], autoload=False), **json.loads(sys.argv[2]))
"""


def test_a_sigkilled_training_process_leaves_its_run_unlocked_and_resumable(tmp_path):
    """kill -9 of a real training process in epoch 3 (stalled there by a hook, so the kill never lands
    in a checkpoint write, which is the checkpoint format's business): while it lives the directory is
    locked by its PID; after the kill the kernel has dropped the lock, and a plain resume finishes the
    run to the same weights as an uninterrupted 5-epoch run."""
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_RUN, str(run), json.dumps(FAST)], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "stalled"
        with pytest.raises(RunDirLocked, match=f"process {proc.pid}; wait for it or stop it"):
            RunDirLock(run).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and _epochs(run) == [1, 2]
    resumed = vaekit.resume(run, quiet=True, figures=False)  # to the recorded 5 epochs
    full = vaekit.train(epochs=5, out=str(tmp_path / "full"), **FAST)
    assert [m["epoch"] for m in resumed.history] == _epochs(run) == [1, 2, 3, 4, 5]
    assert _same(resumed.model.state_dict(), full.model.state_dict())


# --- resume that means what it says ----------------------------------------------------------------

@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "r"
    vaekit.train(epochs=1, out=str(run), **FAST)
    return run


@pytest.mark.parametrize("flag", [["--beta", "0"], ["--seed", "0"], ["--no-fused-op"], ["--lr", "0.1"],
                                  ["--latent-dim", "2"], ["--overwrite"], ["--out", "elsewhere"], ["--data", DATA]])
def test_resume_refuses_any_other_flag_whatever_its_value(one_epoch, flag):
    """--beta 0 and --seed 0 (the recorded values!) and the bool --no-fused-op are refused like --lr 0.1."""
    before = _snapshot(one_epoch)
    one_line_error(invoke("run", "--resume", one_epoch, *flag, "--epochs", "2"), f"only --epochs may change (got {flag[0]})")
    assert _snapshot(one_epoch) == before


def test_a_new_epochs_target_is_recorded_and_a_later_plain_resume_continues_to_it(tmp_path):
    """`--resume D --epochs 3` interrupted after epoch 2; a plain `--resume D` trains epoch 3 and ends
    bit-identical (weights and test ELBO) to an uninterrupted 3-epoch run."""
    run = tmp_path / "r"
    vaekit.train(epochs=1, out=str(run), **FAST)

    def interrupt(trainer, epoch):
        if epoch == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vaekit.resume(run, epochs=3, quiet=True, figures=False, pm=_pm(interrupt))
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 3
    assert _epochs(run) == [1, 2]
    res = invoke("run", "--resume", run, "--no-progress", "--no-figures")
    assert res.exit_code == 0, res.output
    full = vaekit.train(epochs=3, out=str(tmp_path / "full"), **FAST)
    assert _epochs(run) == [1, 2, 3]
    assert _same(_weights(run), full.model.state_dict())
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["test_elbo"] == full.metrics["test_elbo"]


def test_fewer_epochs_than_done_is_an_error_and_a_finished_run_says_so(tmp_path):
    run = tmp_path / "r"
    vaekit.train(epochs=2, out=str(run), **FAST)
    before = _snapshot(run)
    line = one_line_error(invoke("run", "--resume", run, "--epochs", "1"), "has already trained 2 epochs")
    assert "--epochs N with N > 2" in line
    assert _snapshot(run) == {**before, ".lock": b""}  # config.json (epochs 2), weights and metrics untouched
    for args in ([], ["--epochs", "2"]):  # all recorded epochs done: exit 0, and it says so
        res = invoke("run", "--resume", run, *args, "--no-progress", "--no-figures")
        assert res.exit_code == 0, res.output
        assert "nothing to train; pass --epochs N (> 2) to continue" in " ".join(res.stderr.split())
        assert _epochs(run) == [1, 2] and (run / "model.safetensors").read_bytes() == before["model.safetensors"]


def test_fewer_epochs_than_a_mid_epoch_checkpoint_reached_is_an_error(tmp_path):
    """A kill mid-epoch 2 after a --checkpoint-every commit: the weights are part-way into epoch 2, so
    --epochs 1 would report a finished 1-epoch run with other weights; it is refused, nothing changed."""
    run = tmp_path / "r"
    env = {**_env(), checkpoint.KILL_ENV: "step:8"}  # 5 steps an epoch, commits at steps 2, 4, 5 (end), 6
    proc = subprocess.run([sys.executable, "-m", "vaekit", "run", *FLAGS, "--epochs", "2", "--checkpoint-every", "2",
                           "--out", str(run), "-q"], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    from safetensors import safe_open

    with safe_open(str(run / checkpoint.STATE), framework="pt") as f:
        meta = f.metadata()
    assert (meta["epoch"], meta["position"]) == ("1", "1")  # committed: epoch 1 and one batch of epoch 2
    before = _snapshot(run)
    line = one_line_error(invoke("run", "--resume", run, "--epochs", "1"), "has already trained 1 epochs and part of epoch 2")
    assert "--epochs N with N >= 2" in line
    assert _snapshot(run) == {**before, ".lock": b""}


def test_a_stop_requested_by_an_epoch_end_hook_is_committed_and_resume_trains_nothing(tmp_path, capsys):
    class StopAtOne:
        @vaekit.hookimpl
        def vaekit_epoch_end(self, trainer, epoch, metrics):
            if epoch == 1:
                trainer.request_stop("enough")

    run = tmp_path / "r"
    pm = PluginManager(extra_plugins=[StopAtOne()], autoload=False)
    result = vaekit.train(epochs=3, out=str(run), pm=pm, **FAST)
    assert [m["epoch"] for m in result.history] == _epochs(run) == [1]
    assert json.loads((run / "metrics.jsonl").read_text())["stopped"] == "enough"
    again = vaekit.resume(run, pm=PluginManager(autoload=False), quiet=False, figures=False)
    assert [m["epoch"] for m in again.history] == [1] and "nothing to resume" in capsys.readouterr().err


def test_train_refuses_resume_and_points_to_resume(tmp_path):
    with pytest.raises(ConfigError, match=r"continue one with vaekit.resume\(run_dir, epochs=N\)"):
        vaekit.train(epochs=1, out=str(tmp_path / "r"), resume=True, **FAST)


# --- a run that fails in epoch 1 is not stuck ------------------------------------------------------

def test_a_run_interrupted_in_epoch_1_restarts_in_place_bit_identically(tmp_path, capsys):
    """Ctrl-C in epoch 1 leaves config.json and no checkpoint; the message names `vaekit run --resume D`,
    which starts it from epoch 1 with the recorded config: the same weights as an uninterrupted run."""
    run = tmp_path / "r"

    def interrupt(trainer, epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vaekit.train(epochs=2, out=str(run), pm=_pm(interrupt), **FAST)
    err = capsys.readouterr().err
    assert f"holds no checkpoint (vaekit run --resume {run} starts it again from epoch 1)" in err
    assert not checkpoint.has_checkpoint(run) and (run / "config.json").is_file()
    res = invoke("run", "--resume", run, "--no-progress", "--no-figures")
    assert res.exit_code == 0, res.output
    assert "starting it again from epoch 1" in " ".join(res.stderr.split())
    full = vaekit.train(epochs=2, out=str(tmp_path / "full"), **FAST)
    assert checkpoint.has_checkpoint(run) and _epochs(run) == [1, 2]
    assert _same(_weights(run), full.model.state_dict())


def test_nan_and_a_full_disk_name_the_command_that_works(tmp_path):
    """A NaN loss in epoch 2 (5 steps an epoch) and a full disk at the end of epoch 2: one line naming
    `vaekit run --resume D`, which finishes the run after the full disk (and --overwrite, for a new
    try after the NaN)."""
    import plugin_for_tests

    run = tmp_path / "nan"
    with pytest.raises(vaekit.TrainingError, match=rf"at step 6 \(epoch 2\).*last good checkpoint \(epoch 1\) is kept "
                                                   rf"in {run} \(vaekit run --resume {run} continues from it\).*--overwrite"):
        vaekit.train(epochs=2, out=str(run), likelihood="nan_after:step=6",
                     pm=PluginManager(extra_plugins=[plugin_for_tests], autoload=False), **FAST)
    run = tmp_path / "full"

    def disk_full(trainer, epoch):
        if epoch == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=rf"No space left on device; the last good checkpoint \(epoch 1\) is kept in "
                                          rf"{run} \(vaekit run --resume {run} continues from it\)"):
        vaekit.train(epochs=2, out=str(run), pm=_pm(disk_full), **FAST)
    resumed = vaekit.resume(run, quiet=True, figures=False)
    assert [m["epoch"] for m in resumed.history] == [1, 2]


def test_overwrite_replaces_a_run_and_only_vaekits_files(tmp_path):
    """--overwrite: a new run in the folder of a finished one (the same weights as that run made
    elsewhere, one metrics line per epoch); the user's own file there is kept."""
    run = tmp_path / "r"
    vaekit.train(epochs=2, out=str(run), **FAST)
    (run / "notes.txt").write_text("mine")
    one_line_error(invoke("run", *FLAGS, "--epochs", "1", "--out", run), "already holds a run")
    res = invoke("run", *FLAGS, "--epochs", "1", "--seed", "3", "--out", run, "--overwrite")
    assert res.exit_code == 0, res.output
    fresh = vaekit.train(epochs=1, seed=3, out=str(tmp_path / "fresh"), **FAST)
    assert _epochs(run) == [1] and _same(_weights(run), fresh.model.state_dict())
    assert (run / "notes.txt").read_text() == "mine"


# --- other people's files --------------------------------------------------------------------------

def test_out_refuses_a_folder_that_is_not_a_run_and_writes_nothing(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    for name in ("model.safetensors", "samples.png", "metrics.jsonl"):
        (folder / name).write_bytes(b"someone else's " + name.encode())
    before = _snapshot(folder)
    for extra in ([], ["--overwrite"]):
        one_line_error(invoke("run", *FLAGS, "--epochs", "1", "--out", folder, *extra), "no vaekit config.json")
        assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    with pytest.raises(ConfigError, match="choose a new or empty folder"):
        vaekit.train(epochs=1, out=str(folder), **FAST)
    (tmp_path / "empty").mkdir()
    assert _epochs(vaekit.train(epochs=1, out=str(tmp_path / "empty"), **FAST).run_dir) == [1]


def test_export_refuses_to_write_over_a_runs_own_files(one_epoch, tmp_path):
    before = _snapshot(one_epoch)
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "trainer_state.safetensors", "samples.png"):
        one_line_error(invoke("export", one_epoch, "--out", one_epoch / name), "own files")
    assert _snapshot(one_epoch) == before
    check_not_run_file(one_epoch / "exported.pt")  # a new name in the run directory is fine
    check_not_run_file(tmp_path / "model.safetensors")  # so is the name in a folder that is not a run


def test_the_lock_is_released_for_the_next_writer_in_the_same_process(one_epoch):
    """flock conflicts between open files of one process too: fit must release the lock, also when it
    fails after taking it (a run already there; a plugin's error mid-training)."""
    run = one_epoch
    with pytest.raises(ConfigError, match="already holds a run"):
        vaekit.train(epochs=1, out=str(run), **FAST)

    def boom(trainer, epoch):
        raise ValueError("a plugin failed")

    with pytest.raises(ValueError, match="a plugin failed"):
        vaekit.resume(run, epochs=2, quiet=True, figures=False, pm=_pm(boom))
    with RunDirLock(run):
        with pytest.raises(RunDirLocked, match=f"process {os.getpid()}"):
            RunDirLock(run).acquire()
    RunDirLock(run).acquire().release()


def test_a_folder_left_by_a_kill_before_config_json_is_not_foreign(tmp_path):
    """A kill while config.json was being written leaves `.lock` and `.config.json.*.tmp`: the same
    command starts the run (and removes the temporary); a real file of the user's is still refused."""
    run = tmp_path / "r"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / ".config.json.abc123.tmp").write_text("{")
    vaekit.train(epochs=1, out=str(run), **FAST)
    assert not (run / ".config.json.abc123.tmp").exists() and checkpoint.has_checkpoint(run)
    other = tmp_path / "other"
    other.mkdir()
    (other / ".config.json.abc123.tmp").write_text("{")
    (other / "data.csv").write_text("1,2")
    with pytest.raises(ConfigError, match=r"other files in it \(data.csv\)"):
        vaekit.train(epochs=1, out=str(other), **FAST)
