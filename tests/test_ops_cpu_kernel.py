"""The fused op's C++ kernel build: keyed cache, a lock that cannot go stale, kills at any moment."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaekit.ops import cpu_kernel

# What a vaekit command does with the kernel: run the op once on the CPU and report which path ran.
SCRIPT = """
import torch
from vaekit.ops import cpu_kernel, reparameterize_kl
z, kl = reparameterize_kl(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3))
assert torch.equal(z, torch.ones(4, 3)) and torch.allclose(kl, torch.zeros(4))
print("STATUS", cpu_kernel.status())
"""


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VAEKIT_DISABLE_CPP_KERNEL"}
    return {**env, "VAEKIT_KERNEL_CACHE": str(cache), **extra}


def _run(env, timeout=400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=timeout)


def _kernel_dir(cache: Path) -> Path:
    old = os.environ.get("VAEKIT_KERNEL_CACHE")
    os.environ["VAEKIT_KERNEL_CACHE"] = str(cache)
    try:
        return cpu_kernel.kernel_dir()
    finally:
        if old is None:
            del os.environ["VAEKIT_KERNEL_CACHE"]
        else:
            os.environ["VAEKIT_KERNEL_CACHE"] = old


def test_cache_key_separates_sources_flags_and_torch_versions(monkeypatch):
    source, flags = b"int f() { return 1; }", ["-O3"]
    key = cpu_kernel.cache_key(source, flags)
    assert key == cpu_kernel.cache_key(source, list(flags))
    assert key != cpu_kernel.cache_key(source + b" ", flags)  # another checkout or version of the kernel
    assert key != cpu_kernel.cache_key(source, ["-O2"])
    monkeypatch.setattr(cpu_kernel.torch, "__version__", "0.0.0")
    assert key != cpu_kernel.cache_key(source, flags)


def test_a_live_builder_gets_a_bounded_wait_then_the_eager_path(tmp_path):
    """Another process holding the build lock past the timeout: the run goes on with the eager formula."""
    if not hasattr(fcntl, "flock"):
        pytest.skip("no flock")
    lock = _kernel_dir(tmp_path).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        start = time.monotonic()
        out = _run(_env(tmp_path, VAEKIT_KERNEL_BUILD_TIMEOUT="2"), timeout=120)
        waited = time.monotonic() - start
    assert out.returncode == 0, out.stderr
    assert "STATUS torch fallback" in out.stdout and "held the kernel build lock for 2 s" in out.stdout
    assert waited < 60
    lines = [line for line in out.stderr.splitlines() if line.startswith("vaekit:")]
    assert len(lines) == 1 and "fallback" in lines[0], out.stderr  # one warning line


def _wait_for(predicate, proc, limit=300.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert proc.poll() is None, "the build finished before the moment of the kill"
        assert time.monotonic() < deadline, "timed out waiting for the moment of the kill"
        time.sleep(0.05)


def _start(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill(proc: subprocess.Popen, whole_group: bool) -> None:
    """SIGKILL the python process (as the OOM killer does) or its whole process group; then stop any
    orphaned ninja/compiler so it cannot race the next build for the cores."""
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_kills_during_a_cold_cache_build_never_hang_a_later_run(tmp_path):
    """SIGKILL a cold-cache build at several moments: the builder alone while its compiler starts; a
    second process while it waits for a live builder; the builder's whole process group once its
    object file is written (linking/loading).  The next run completes with the compiled kernel,
    and later runs reuse it."""
    env = _env(tmp_path)
    final = _kernel_dir(tmp_path)
    building = lambda: list(tmp_path.glob(final.name + ".build-*"))  # noqa: E731

    builder = _start(env)
    _wait_for(lambda: bool(building()), builder)
    _kill(builder, whole_group=False)

    builder = _start(env)
    _wait_for(lambda: any(p.name.endswith(f"-{builder.pid}") for p in building()), builder)
    waiter = _start(env)
    time.sleep(1.5)  # blocked on the build lock
    assert waiter.poll() is None
    _kill(waiter, whole_group=False)
    _wait_for(lambda: any(p.glob("*.o") for p in building()), builder)
    _kill(builder, whole_group=True)
    assert not final.exists(), "a killed build published a kernel"

    out = _run(env)
    assert out.returncode == 0, out.stderr
    assert "STATUS C++ kernel" in out.stdout and "built" in out.stdout, out.stdout + out.stderr
    assert (final / f"{final.name.rsplit('-', 1)[0]}.so").is_file()
    assert not building(), "the killed builds' folders were not cleaned up"
    again = _run(env)
    assert "STATUS C++ kernel" in again.stdout and "cached" in again.stdout, again.stdout + again.stderr


SCALAR_SCRIPT = """
import torch
from vaekit.ops import cpu_kernel
from vaekit.ops.bernoulli import bernoulli_log_prob, bernoulli_log_prob_eager
from vaekit.ops.fused import reparameterize_kl
from vaekit.ops.philox import bernoulli_philox, bernoulli_philox_eager
from vaekit.ops.reference import reparameterize_kl_eager
assert cpu_kernel.load() and "vaekit_kernels_default" in cpu_kernel.status(), cpu_kernel.status()
import platform  # the compiler was told not to use AVX2 (not left to its default target)
assert platform.machine().lower() not in ("x86_64", "amd64") or "-mno-avx2" in cpu_kernel._flags()[1]
g = torch.Generator().manual_seed(0)
for n, offset, seed in [(128 * 784, 0, 5), (1000, 37, 2**40 + 3), (129, 127, -5), (5, 3, 0), (4097, 1, 2**63 - 9)]:
    p = torch.rand(n, generator=g)
    assert torch.equal(bernoulli_philox(p, seed, offset), bernoulli_philox_eager(p, seed, offset)), (n, offset, seed)
logits, x = 8 * torch.randn(7, 37, generator=g), torch.rand(7, 37, generator=g).round()
assert torch.allclose(bernoulli_log_prob(logits, x, 1), bernoulli_log_prob_eager(logits, x, 1), rtol=1e-6, atol=1e-4)
mu, logvar, eps = (torch.randn(6, 11, generator=g) for _ in range(3))
for a, b in zip(reparameterize_kl(mu, logvar, eps), reparameterize_kl_eager(mu, logvar, eps)):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
print("SCALAR OK", cpu_kernel.status())
"""


def test_the_kernels_built_without_avx2_equal_the_eager_formulas(tmp_path):
    """On a CPU without AVX2 (here: torch told so, ATEN_CPU_CAPABILITY=default) the kernels are built
    without -mavx2, so the C++ code's scalar paths run (the Philox draws' scalar blocks among them):
    bit for bit the eager Philox draws, the eager log-likelihood and fused op to rounding."""
    out = subprocess.run([sys.executable, "-c", SCALAR_SCRIPT], env=_env(tmp_path, ATEN_CPU_CAPABILITY="default"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "SCALAR OK" in out.stdout, out.stdout + out.stderr
