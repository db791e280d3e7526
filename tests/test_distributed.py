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

import numpy as np
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
from vaekit.manager import PluginManager


class StopOnRank1:  # a convergence test that decides differently on one rank: every rank must stop with it
    @vaekit.hookimpl
    def vaekit_epoch_end(self, trainer, epoch, metrics):
        if os.environ.get("RANK") == "1":
            trainer.request_stop("converged on rank 1")


result = vaekit.train(data="digits", encoder="mlp:hidden=32", prior="none", latent_dim=2, epochs=3, batch_size=205,
                      regularizers=["adversarial:width=16,depth=1"], out=sys.argv[1], quiet=True, figures=False,
                      pm=PluginManager([StopOnRank1()]))
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
    metrics = _metrics(tmp_path / "run")
    assert "train_adversarial_d_loss" in metrics[-1]  # the discriminator did train
    # the stop one rank's epoch-end hook asked for is agreed: both ranks stop after epoch 1 (before: rank 0 went on
    # to epoch 2 alone and the collectives no longer matched)
    assert [m["epoch"] for m in metrics] == [1] and metrics[0]["stopped"] == "converged on rank 1"


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


# --- the collectives at unit level: two ranks started by hand ------------------------------------

COLLECTIVES = r"""
import json, torch
from vaekit import distributed
from vaekit.errors import DataError
torch.set_num_threads(1)
group = distributed.connect(torch.device("cpu"))
r = group.rank
out = {}
# a regularizer's own optimizer: uneven shares 3 + 2 of a global batch of 5, each rank its own gradient
w = torch.nn.Parameter(torch.arange(6, dtype=torch.float64).reshape(2, 3))
w.grad = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r))
group.begin_batch(5, group.share(5)[1] - group.share(5)[0])
group.sync_optimizer(torch.optim.SGD([w], lr=1.0)).step()
out["w"] = w.detach().tolist()
# loss terms: the same names in another order are summed by name
sums, n = group.batch_sums({"loss": 1.0 + r, "mmd": 10.0 * (r + 1)} if r else {"mmd": 10.0, "loss": 1.0}, 3 - r)
out["sums"], out["n"] = sums, n
# names that differ (a penalty missing on rank 1): one line on every rank, nothing summed by mistake
try:
    group.batch_sums({"loss": 1.0, "mmd": 1.0} if r == 0 else {"loss": 1.0}, 1)
except Exception as e:
    out["names"] = [type(e).__name__, str(e), distributed.reported_by_main(e)]
# a failure on rank 1 alone (its share of a batch it cannot read), settled before the step
try:
    group.settle(DataError("cannot read image 'x.png': image file is truncated") if r == 1 else None)
except Exception as e:
    out["failure"] = [type(e).__name__, str(e), distributed.reported_by_main(e)]
out["own"] = distributed.reported_by_main(DataError("rank's own"))  # not shared: the rank prints it itself
group.close()
print(json.dumps(out), flush=True)
"""


def test_collectives_of_two_ranks(tmp_path):
    env = _env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), VAEKIT_DIST_TIMEOUT="60")
    procs = [subprocess.Popen([sys.executable, "-c", COLLECTIVES], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    got = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    # _SyncedOptimizer: SGD(lr=1) steps by the gradient of the global batch's mean loss, Σ_r (B_r / B) g_r
    g = [torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(r)) for r in range(2)]
    expected = torch.arange(6, dtype=torch.float64).reshape(2, 3) - (3 / 5 * g[0] + 2 / 5 * g[1])
    for r in range(2):  # seen: max |Δ| 0.0 (a plain mean (g0 + g1) / 2 is off by ~0.1)
        assert torch.allclose(torch.tensor(got[r]["w"], dtype=torch.float64), expected, atol=1e-12, rtol=0)
    assert got[0]["sums"] == got[1]["sums"] == {"loss": 3.0, "mmd": 30.0} and got[0]["n"] == 5
    message = ("the 2 processes' loss terms (or metrics) differ: rank 0 has loss, mmd; rank 1 has loss: a plugin "
               "returned a term (a penalty) on some ranks only; it must return a tensor on every rank")
    assert got[0]["names"] == ["TrainingError", message, False] and got[1]["names"] == ["TrainingError", message, True]
    # rank 0 prints the failure of rank 1 (named), rank 1 stays silent
    assert got[0]["failure"] == ["PeerError", "rank 1 of 2 failed: cannot read image 'x.png': image file is truncated",
                                 False]
    assert got[1]["failure"] == ["DataError", "cannot read image 'x.png': image file is truncated", True]
    assert got[1]["own"] is False


@pytest.mark.parametrize("connected", [False, True])
def test_what_a_rank_other_than_0_prints(monkeypatch, capsys, connected):
    from vaekit.cli import report_error
    from vaekit.errors import DataError

    monkeypatch.setattr(distributed, "PEER_GRACE", 0.0)
    monkeypatch.setattr(distributed, "_connected", connected)
    for name, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    report_error(ConfigError("run directory /x does not exist"))  # every rank reads the same command line
    report_error(distributed.mark_shared(DataError("shared")))
    report_error(distributed.PeerError("rank 0 of 2 failed: disk full"))
    report_error(DataError("cannot read image 'a.png'"))  # this rank's own
    report_error(RuntimeError("boom"))  # not vaekit's: every rank says it
    lines = capsys.readouterr().err.splitlines()
    boom = "error: rank 1: unexpected RuntimeError: boom (run with --debug for the traceback)"
    if connected:  # the process group is up: only errors shared through it are left to rank 0
        assert lines == ["error: rank 1: run directory /x does not exist", "error: rank 1: cannot read image 'a.png'",
                         boom]
    else:  # before it every rank runs the same command line on the same files: LOCAL_RANK 0 prints (once a machine)
        assert lines == [boom]


def test_ctrl_c_is_reported_by_rank_0_alone(monkeypatch):
    import typer
    from typer.testing import CliRunner

    from vaekit.cli import VaekitGroup

    app = typer.Typer(cls=VaekitGroup)

    @app.command()
    def stop() -> None:
        raise KeyboardInterrupt

    @app.command()
    def other() -> None:
        pass

    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        done = CliRunner().invoke(app, ["stop"])
        assert done.exit_code == 130 and ("error: interrupted" in done.output) is shown


def test_regularizers_with_per_sample_state_are_refused_under_torchrun():
    from vaekit.plugins.regularizers import MMD, Sparsity

    class PerSample(Sparsity):
        name = "persample"
        supports_distributed = False

    group = distributed.Distributed(torch.device("cpu"), 0, 2, 0, "gloo")  # no process group needed
    group.check_regularizers([Sparsity(4, (1, 8, 8)), MMD(4, (1, 8, 8))])
    with pytest.raises(ConfigError, match=r"^persample cannot train on 2 processes \(it keeps per-sample state: "
                                          r"supports_distributed is False\)"):
        group.check_regularizers([Sparsity(4, (1, 8, 8)), PerSample(4, (1, 8, 8))])
    distributed.Single(torch.device("cpu")).check_regularizers([PerSample(4, (1, 8, 8))])  # one process: fine


def test_every_regularizer_that_keeps_per_sample_state_declares_it():
    # meta-test over the sources: a Regularizer subclass reading record.index (state per training sample) must set
    # supports_distributed = False (the DEC/DCN of plugins/vaekit-cluster do)
    import ast

    files = [*(ROOT / "vaekit").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    flagged = {}
    for path in files:
        tree = ast.parse(path.read_text())
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            if "record.index" in ast.unparse(cls) and any("Regularizer" in ast.unparse(b) for b in cls.bases):
                flags = [n for n in cls.body if isinstance(n, ast.Assign)
                         and any(getattr(t, "id", "") == "supports_distributed" for t in n.targets)]
                flagged[cls.name] = bool(flags) and ast.literal_eval(flags[0].value) is False
    assert {"DEC", "DCN"} <= set(flagged)
    assert all(flagged.values()), flagged


# --- out-of-core data, --max-steps, a penalty and resume across world sizes ---------------------

@pytest.mark.slow  # launches torchrun twice: 2 processes import torch
def test_lazy_npy_with_workers_max_steps_and_a_penalty_under_torchrun_and_resume_across_world_sizes(tmp_path):
    from sklearn.datasets import load_digits

    data = tmp_path / "digits.npy"
    np.save(data, (load_digits().images * 15).astype(np.uint8))  # 1797 rows: 1617 train (read lazily), 180 test
    # batch 269: 6 batches an epoch, shares 135 + 134, the last batch 3 = 2 + 1.  contractive:exact is a mean of
    # per-sample Jacobian norms (exact under DDP); mmd (weight 0: a batch statistic of each rank's share, no
    # gradient) logs a term on the rank whose share is one sample too
    args = ["--data", f"file:path={data},lazy=true", "--workers", "1", "--encoder", "mlp:hidden=32", "--prior", "none",
            "--latent-dim", "4", "--regularizer", "contractive:estimator=exact", "--regularizer", "mmd:weight=0",
            "--epochs", "2", "--batch-size", "269", "--no-figures", "--no-progress", "-q"]
    one, two = tmp_path / "one", tmp_path / "two"
    _ok(one_process(*args, "--max-steps", "4", "--out", str(one)))
    _ok(torchrun(*args, "--max-steps", "4", "--out", str(two)))
    # seen: max |Δθ| 1.5e-08 after 4 steps (a broken Distributed.loss_scale: 1.3e-03, review 14)
    assert _max_diff(one, two) < 1e-4
    # resume across world sizes: the run of 1 process continues on 2 (its epoch's end: the 2 + 1 batch), the run
    # of 2 on 1, both to step 8
    _ok(torchrun("--resume", str(one), "--max-steps", "8"))
    _ok(one_process("--resume", str(two), "--max-steps", "8"))
    # seen: max |Δθ| 3.0e-08 (the averaging order differs: equal up to float rounding, not bit-identical)
    assert _max_diff(one, two) < 1e-4
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [7]
    # the epoch's train means: sums over both ranks' shares; seen: |Δ train_loss| 3.6e-07, relative
    # Δ train_contractive 5e-09 (train_mmd differs: each rank's own batch statistic, 0.1640 vs 0.1641)
    assert m1[0]["train_loss"] == pytest.approx(m2[0]["train_loss"], abs=1e-4)
    assert m1[0]["train_contractive"] == pytest.approx(m2[0]["train_contractive"], rel=1e-5)
    assert "train_mmd" in m1[0] and "train_mmd" in m2[0]


@pytest.mark.slow  # launches torchrun: 2 processes import torch
def test_an_image_only_rank_1_cannot_read_stops_every_rank_in_one_line(tmp_path):
    # review 14's repro: truncated PNGs only in rank 1's share of the first global batch of a lazy folder
    from PIL import Image

    from vaekit.data import load_mnist5k, load_path

    folder = tmp_path / "pngs"
    d = load_mnist5k(20, 1).keep_classes([0, 1, 2])
    for i, (x, y) in enumerate(zip(d.train.values.squeeze(1).numpy(), d.train_y.tolist())):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x, mode="L").save(folder / str(y) / f"{i:03d}.png")
    files = load_path(str(folder), lazy="true").train.files
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))  # the first epoch's shuffle
    broken = [int(i) for i in perm[8:16] if int(i) > 1]  # rank 1's share of batch 1 (B = 16); 0, 1: the warm-up's
    for i in broken:
        files[i].write_bytes(files[i].read_bytes()[:60])  # the header intact: the folder still loads
    start = time.monotonic()
    done = torchrun("--data", f"file:path={folder},lazy=true", "--encoder", "mlp:hidden=8", "--epochs", "1",
                    "--batch-size", "16", "--out", str(tmp_path / "run"), "--no-figures", "--no-progress", timeout=120,
                    VAEKIT_DIST_TIMEOUT="60")
    assert done.returncode != 0 and time.monotonic() - start < 60  # no rank waits for the timeout
    # before: only rank 0's "unexpected RuntimeError: ... Connection closed by peer"
    errors = _errors(done)
    assert len(errors) == 1 and re.fullmatch(r"error: rank 1 of 2 failed: cannot read image '.*\.png': image file "
                                             r"is truncated.*", errors[0]), done.stderr[-2000:]
    assert _no_vaekit_traceback(done)
