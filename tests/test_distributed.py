"""Training under torchrun (vaekit.distributed): 2 CPU processes (gloo) compute the one-process update.

Each test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m vaekit run ...``
(one thread per rank) on scikit-learn's digits and compares it with an independent reference: the
same run in one process, an uninterrupted run, the other rank's weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaekit import distributed
from vaekit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vaekit", "run"]
TIMING = {"samples_per_s", "epoch_seconds"}

# digits: 1438 training samples.  Batch 205: 7 full batches (103 + 102 rows a rank) and a last batch of
# 3 (2 + 1): every step's shares are uneven, so the loss scaling matters
AE = ["--data", "digits", "--encoder", "mlp:hidden=32", "--prior", "none", "--latent-dim", "4", "--epochs", "1",
      "--batch-size", "205", "--no-figures"]
# a VAE: its noise ε is drawn per rank; 12 steps an epoch (the last of 30 samples)
VAE = ["--data", "digits", "--encoder", "mlp:hidden=32", "--latent-dim", "4", "--epochs", "2", "--batch-size", "128",
       "--no-figures", "-q"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "VAEKIT_TEST_KILL_AT")}
    env.update(PYTHONPATH=str(ROOT), VAEKIT_DISABLE_CPP_KERNEL="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               MPLBACKEND="Agg", **extra)
    return env


def torchrun(*args: str, timeout: float = 150, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, *args], capture_output=True, text=True, env=_env(**env), timeout=timeout)


def one_process(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vaekit", "run", *args], capture_output=True, text=True,
                          env=_env(**env), timeout=timeout)


def _ok(done: subprocess.CompletedProcess) -> None:
    out = "\n".join(line for line in (done.stdout + done.stderr).splitlines() if "reducer.cpp" not in line)
    assert done.returncode == 0, out[:3000]  # vaekit's lines come before torchrun's report


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert set(wa) == set(wb)
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _errors(done: subprocess.CompletedProcess) -> list[str]:
    """vaekit's own error lines (torchrun's launcher adds its ChildFailedError report after them)."""
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]


def _no_vaekit_traceback(done: subprocess.CompletedProcess) -> bool:
    return not re.search(r'File ".*[/\\]vaekit[/\\]', done.stdout + done.stderr)


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_two_processes_train_the_one_process_update(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(one_process(*AE, "-q", "--out", str(one)))
    done = torchrun(*AE, "--no-progress", "--out", str(two))
    _ok(done)
    # the parameters after one epoch (7 uneven steps and a last batch split 2 + 1) are the one-process ones
    # seen: max |Δθ| 1.5e-08, 1.5e-08, 3.0e-08 (seeds 0, 1, 2)
    assert _max_diff(one, two) < 1e-4
    m1, m2 = _metrics(one)[-1], _metrics(two)[-1]
    # the test set sharded over the ranks, the sample-weighted mean of their means
    # seen: |Δ test_log_px| 1.9e-06, 1.2e-06, 6.6e-07 nats; |Δ train_loss| 2.0e-06, 1.3e-06, 2.1e-06 (seeds 0, 1, 2)
    assert m1["test_log_px"] == pytest.approx(m2["test_log_px"], abs=1e-3)  # the issue asks 0.1 nats
    assert m1["train_loss"] == pytest.approx(m2["train_loss"], abs=1e-3)
    assert m1["step"] == m2["step"] == 8
    # rank 0 alone prints and writes; what it records about the processes
    out = done.stdout + done.stderr
    assert out.count("epoch 1/1") == 1 and out.count("run written to") == 1
    info = json.loads((two / "config.json").read_text())
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["backend"] == "gloo"
    seeds = info["distributed"]["rank_seeds"]
    assert seeds[0] == 0 and seeds[1] == distributed.rank_seed(0, 1) != 0


@pytest.fixture(scope="module")
def vae_runs(tmp_path_factory):
    """A 2-epoch VAE trained by 2 processes, and by one."""
    base = tmp_path_factory.mktemp("vae")
    _ok(torchrun(*VAE, "--out", str(base / "two")))
    _ok(one_process(*VAE, "--out", str(base / "one")))
    return base


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_a_vae_under_torchrun_reaches_the_one_process_test_elbo(vae_runs):
    import vaekit

    one, two = _metrics(vae_runs / "one"), _metrics(vae_runs / "two")
    assert one[-1]["step"] == two[-1]["step"] == 24
    # rank 1 draws its own noise ε, so the weights differ, but only as much as another noise stream makes
    # them: the test ELBO of both, estimated with the same noise (vaekit.evaluate, one process)
    # seen: |Δ| 0.0010, 0.015, 0.0050 nats (seeds 0, 1, 2; ELBO ≈ -40 after 2 epochs)
    e1 = vaekit.evaluate(vae_runs / "one", nll_samples=0, device="cpu")["elbo"]
    e2 = vaekit.evaluate(vae_runs / "two", nll_samples=0, device="cpu")["elbo"]
    assert abs(e1 - e2) < 0.1
    # the logged test_elbo is the one-process estimate (vaekit.evaluate) whatever the number of ranks: the test
    # set is sharded by whole evaluation batches, each seeded on its own (here one batch of 359: rank 1 has none)
    # seen: logged - vaekit.evaluate 0.0 exactly, two processes and one (before: 0.020, 0.010, -0.145 nats)
    assert two[-1]["test_elbo"] == pytest.approx(e2, abs=1e-5)
    assert one[-1]["test_elbo"] == pytest.approx(e1, abs=1e-5)


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_resume_under_torchrun_continues_the_uninterrupted_run(vae_runs, tmp_path):
    part = tmp_path / "part"
    # both ranks are killed (SIGKILL) at their 6th step; the committed checkpoint is step 4's, mid-epoch 1
    killed = torchrun(*VAE, "--checkpoint-every", "4", "--out", str(part), VAEKIT_TEST_KILL_AT="step:6")
    assert killed.returncode != 0
    state = load_file(part / "trainer_state.safetensors")
    assert {"extra.distributed.rank0.torch", "extra.distributed.rank1.torch"} <= set(state)  # every rank's stream
    _ok(torchrun("--resume", str(part), "-q"))
    # bit-identical to the run never interrupted: every rank's noise stream was restored
    # seen: max |Δθ| 0.0; with rank 1 resumed on rank 0's stream: 2.2e-03
    assert _max_diff(part, vae_runs / "two") == 0.0
    assert _metrics(part) == _metrics(vae_runs / "two")


ADVERSARIAL = r"""
import os, sys, torch
torch.set_num_threads(1)
import vaekit
result = vaekit.train(data="digits", encoder="mlp:hidden=32", prior="none", latent_dim=2, epochs=1, batch_size=205,
                      regularizers=["adversarial:width=16,depth=1"], out=sys.argv[1], quiet=True, figures=False)
torch.save(result.model.state_dict(), os.path.join(sys.argv[2], "rank%s.pt" % os.environ.get("RANK", "0")))
"""


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_the_adversarial_discriminator_stays_the_same_on_every_rank(tmp_path):
    script = tmp_path / "aae.py"
    script.write_text(ADVERSARIAL)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run([*launch, str(tmp_path / "run"), str(tmp_path)], capture_output=True, text=True,
                          env=_env(), timeout=150)
    _ok(done)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    disc = [k for k in r0 if "discriminator" in k]
    assert disc and set(r0) == set(r1)
    # each rank's discriminator steps on its own codes and prior draws, with the gradients averaged:
    # the two stay identical (seen: every tensor equal; without the averaging they differ by ~1e-3 after
    # one step and the run stops at its checkpoint with "parameters differ")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert "train_adversarial_d_loss" in _metrics(tmp_path / "run")[-1]  # the discriminator did train


# --- bad input: one line, every rank exits -------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_WRITES = r"""
import sys, torch
from vaekit import distributed
group = distributed.connect(torch.device("cpu"))

def write():
    raise OSError(28, "No space left on device")  # rank 0's write fails

try:
    group.on_main(write)
except Exception as e:
    print(type(e).__name__, e, flush=True)
group.close(finished=False)
"""


def test_a_failed_write_on_rank_0_stops_the_other_ranks(tmp_path):
    # two ranks started by hand (what torchrun does): rank 0 fails inside on_main, rank 1 learns of it
    env = _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), VAEKIT_DIST_TIMEOUT="60")
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", RANK_WRITES], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = [p.communicate(timeout=60)[0].strip().splitlines()[-1] for p in procs]
    assert time.monotonic() - start < 50  # nobody waited for the timeout
    assert outs[0] == "OSError [Errno 28] No space left on device"
    assert outs[1] == "PeerError rank 0 of 2 failed: [Errno 28] No space left on device"


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_a_world_larger_than_the_batch_is_one_line(tmp_path):
    done = torchrun(*AE, "--batch-size", "1", "--out", str(tmp_path / "run"), timeout=90)
    assert done.returncode != 0
    assert _errors(done) == ["error: --batch-size 1 is the global batch, shared by 2 processes: give --batch-size >= 2 "
                             "or start fewer processes (torchrun --nproc_per_node)"]
    assert _no_vaekit_traceback(done) and not (tmp_path / "run").exists()


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_a_damaged_checkpoint_under_torchrun_stops_every_rank(vae_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(vae_runs / "two", run)
    state = run / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # cut in half
    start = time.monotonic()
    done = torchrun("--resume", str(run), "--epochs", "3", timeout=90, VAEKIT_DIST_TIMEOUT="60")
    assert done.returncode != 0 and time.monotonic() - start < 60  # no rank waits for the timeout
    errors = _errors(done)
    assert len(errors) == 1 and "trainer state" in errors[0], done.stderr[-2000:]
    assert _no_vaekit_traceback(done)




def test_a_missing_rendezvous_is_one_line(tmp_path):
    done = one_process(*AE, "--out", str(tmp_path / "a"), RANK="0", WORLD_SIZE="2")
    assert done.returncode == 1 and _errors(done) == [
        "error: no rendezvous: MASTER_ADDR and MASTER_PORT not set for the 2 processes; start them with torchrun "
        "(--standalone on one machine, --rdzv-endpoint HOST:PORT on several)"]


def test_a_peer_that_never_arrives_times_out_in_one_line(tmp_path):
    start = time.monotonic()
    done = one_process(*AE, "--out", str(tmp_path / "b"), RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(_free_port()), VAEKIT_DIST_TIMEOUT="2")
    assert done.returncode == 1 and time.monotonic() - start < 60
    errors = _errors(done)
    assert len(errors) == 1 and "within 2 s (VAEKIT_DIST_TIMEOUT)" in errors[0] and _no_vaekit_traceback(done)
    assert not (tmp_path / "b").exists()


def test_fewer_gpus_than_processes_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"one GPU per process.*runs 2 processes and sees 1 GPU: start "
                                          r"torchrun --nproc_per_node=1"):
        distributed.connect(torch.device("cuda"))


def test_a_last_batch_smaller_than_the_world_names_a_batch_size_that_works():
    group = distributed.Distributed(torch.device("cpu"), 0, 4, 0, "gloo")  # no process group needed
    # 1438 = 7 * 205 + 3: a last batch of 3 leaves one of 4 ranks without samples
    with pytest.raises(ConfigError, match=r"last batch of each epoch holds 3 of the 1438 .* fewer than the 4 "
                                          r"processes .* \(e\.g\. 206\)"):
        group.check_batches(1438, 205)
    with pytest.raises(ConfigError, match="holds 3 samples, fewer than the 4 processes"):
        group.check_batches(3, 128)
    group.check_batches(1438, 206)  # 1438 = 6 * 206 + 202: every rank gets samples


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_timeout_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match="VAEKIT_DIST_TIMEOUT must be a positive number"):
        distributed.timeout()


def test_rank_streams_are_distinct_and_rank_0_keeps_the_seed():
    assert distributed.rank_seed(7, 0) == 7
    seeds = {distributed.rank_seed(s, r) for s in range(3) for r in range(1, 5)}
    assert len(seeds) == 12 and all(0 <= s < 2**62 for s in seeds)
