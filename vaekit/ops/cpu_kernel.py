"""vaekit's vectorised C++ CPU kernels, compiled on first use and cached.

``torch.utils.cpp_extension.load`` builds the sources in ``csrc/`` against the installed torch
(about 15–30 s on 2 cores, once) and loads them as one library whose ``TORCH_LIBRARY_IMPL(vaekit,
CPU, …)`` blocks register the CPU kernels of ``vaekit::reparameterize_kl`` and its backward
(:mod:`vaekit.ops.fused`), of ``vaekit::bernoulli_philox`` (:mod:`vaekit.ops.philox`), and define
``vaekit::bernoulli_log_prob`` and ``vaekit::sparse_input_linear`` with their CPU kernels and autograd
(:mod:`vaekit.ops.bernoulli`, :mod:`vaekit.ops.sparse_linear`), so CPU calls never pass through Python.
Where torch runs on OpenMP the kernels are compiled with it, so
their ``at::parallel_for`` uses torch's threads (``torch.set_num_threads``).

The build is safe against kills, races and other installs:

* **Cache key.**  Kernels live in ``$VAEKIT_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/vaekit`` or
  ``~/.cache/vaekit``) under ``<name>-<key>``, the key hashing the source, the flags, the clamp
  bounds, torch's and Python's versions: two checkouts or versions never rebuild each other's
  kernel.
* **Atomic publish.**  A build runs in a private folder ``<name>-<key>.build-<pid>`` and is renamed
  into place only once the library has loaded, so a kill at any moment leaves either no kernel
  or a complete one, never a half-built one that is trusted.
* **A lock that cannot go stale.**  Builders serialise on ``fcntl.flock`` of ``<name>-<key>.lock``,
  which the operating system releases when its holder dies (SIGKILL and OOM included); the next
  builder removes the dead one's folder.  A process that waits longer than
  ``$VAEKIT_KERNEL_BUILD_TIMEOUT`` seconds (default 300) for a live builder gives up and uses the
  eager formula, with one warning line (a wait of over 10 s is announced first, so it is never
  silent).

Where the kernel is impossible (no C++ compiler or ninja, or ``VAEKIT_DISABLE_CPP_KERNEL=1``) the
ops keep their eager implementation and :func:`status` says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from ..errors import first_line
from .reference import LOGVAR_MAX, LOGVAR_MAX_FLOAT16, LOGVAR_MIN

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in (
    "reparameterize_kl.cpp", "bernoulli_philox.cpp", "bernoulli_log_prob.cpp", "sparse_input_linear.cpp"))
HEADERS = (Path(__file__).parent / "csrc" / "rows.h",)  # included by the sources: part of the cache key
DEFAULT_TIMEOUT_S = 300.0
WAIT_NOTE_AFTER_S = 10.0  # a wait longer than this is announced (once), so a pause is never silent
_lock = threading.Lock()
_module: bool = False
_status: str | None = None


def _flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: AVX2 (with Sleef exp) where the CPU has it,
    OpenMP where torch uses it (without it ``at::parallel_for`` runs on one thread).

    The clamp bounds of :mod:`vaekit.ops.reference` are passed as definitions, so the C++ kernel
    cannot disagree with the eager and Triton implementations.
    """
    flags = ["-O3", f"-DVAEKIT_LOGVAR_MIN={LOGVAR_MIN!r}", f"-DVAEKIT_LOGVAR_MAX={LOGVAR_MAX!r}",
             f"-DVAEKIT_LOGVAR_MAX_FLOAT16={LOGVAR_MAX_FLOAT16!r}"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
        tag = "avx2"
    else:  # no AVX2 assumed, whatever the compiler's default target: the kernels' scalar paths
        tag = "default"
        if platform.machine().lower() in ("x86_64", "amd64"):
            flags += ["-mno-avx2", "-mno-fma"]
    if torch.backends.openmp.is_available() and platform.system() == "Linux" and "clang" not in os.environ.get("CXX", ""):
        # GCC's OpenMP, not linked: the GOMP symbols resolve to the libgomp torch has loaded (clang's would
        # need libomp's __kmpc_* symbols, which it lacks)
        flags.append("-fopenmp")
    return f"vaekit_kernels_{tag}", flags


def cache_root() -> Path:
    """Where built kernels are kept: ``$VAEKIT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/vaekit``, else ``~/.cache/vaekit``."""
    if os.environ.get("VAEKIT_KERNEL_CACHE"):
        return Path(os.environ["VAEKIT_KERNEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaekit"


def cache_key(source: bytes, flags: list[str]) -> str:
    """16 hex digits identifying a build: the sources, flags, torch, Python ABI and machine."""
    h = hashlib.sha256(source)
    for part in (*flags, torch.__version__, sys.implementation.cache_tag, platform.machine(),
                 os.environ.get("CXX", "")):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def kernel_dir() -> Path:
    """The folder this install's kernel is published in (``<cache_root>/<name>-<key>``); the build
    lock is that path plus ``.lock``, builds in progress that path plus ``.build-<pid>``."""
    name, flags = _flags()
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    return cache_root() / f"{name}-{cache_key(source, flags)}"


def _timeout() -> float:
    try:
        return float(os.environ.get("VAEKIT_KERNEL_BUILD_TIMEOUT", DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


@contextlib.contextmanager
def _exclusive(path: Path, timeout: float, on_wait):
    """Hold ``flock(path)`` exclusively; yields False if another holder kept it past ``timeout`` s.

    The kernel drops the lock when its holder's process ends, however it ends.  ``on_wait()`` is
    called once if the wait lasts longer than :data:`WAIT_NOTE_AFTER_S`.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: builds still publish atomically
        yield True
        return
    with open(path, "a") as f:
        start, noted = time.monotonic(), False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - start
                if waited >= timeout:
                    yield False
                    return
                if not noted and waited >= WAIT_NOTE_AFTER_S:
                    on_wait()
                    noted = True
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ninja_on_path() -> None:
    """torch's JIT build runs ``ninja`` from PATH; the ``ninja`` wheel's binary may not be on it (an
    unactivated virtual environment), so add its folder."""
    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


def _say(message: str) -> None:
    print(f"vaekit: {message}", file=sys.stderr, flush=True)


def _build(name: str, flags: list[str], final: Path) -> str:
    """Load the cached kernel, building it first if needed; returns how it was obtained.

    Raises TimeoutError if another live process holds the build lock past the timeout, or any
    error of the compiler or loader.
    """
    root = final.parent
    library = final / f"{name}.so"
    if library.is_file():
        torch.ops.load_library(str(library))
        return "cached"
    root.mkdir(parents=True, exist_ok=True)
    timeout = _timeout()
    wait_note = lambda: _say(f"waiting up to {timeout:g} s for another process building vaekit's CPU kernels")  # noqa: E731
    with _exclusive(root / f"{final.name}.lock", timeout, wait_note) as acquired:
        if not acquired:
            raise TimeoutError(f"another process held the kernel build lock for {timeout:g} s")
        if library.is_file():  # built by the process we waited for
            torch.ops.load_library(str(library))
            return "cached"
        for stale in root.glob(f"{final.name}.build-*"):  # left by builders that were killed
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        build = root / f"{final.name}.build-{os.getpid()}"
        build.mkdir()
        _say(f"compiling vaekit's CPU kernels (first use only, cached in {final})")
        _ninja_on_path()
        from torch.utils.cpp_extension import load as load_extension

        load_extension(name=name, sources=[str(s) for s in SOURCES], extra_cflags=flags, build_directory=str(build),
                       is_python_module=False, verbose=False)
        os.replace(build, final)  # publish: complete and loadable, or absent
        return "built"


def autograd_modes_supported() -> bool:
    """Whether the kernels' C++ autograd can serve a call now: not under ``torch.func`` transforms nor
    forward-mode AD, which a C++ ``torch::autograd::Function`` supports neither (the ops then take their
    eager formulas)."""
    return not torch._C._are_functorch_transforms_active() and torch.autograd.forward_ad._current_level < 0


def load() -> bool:
    """Build (first time) and load the kernels; True if they are registered (see :func:`status`)."""
    global _module, _status
    if _status is not None:
        return _module
    with _lock:
        if _status is not None:
            return _module
        if os.environ.get("VAEKIT_DISABLE_CPP_KERNEL", "") not in ("", "0"):
            _status = "torch fallback (VAEKIT_DISABLE_CPP_KERNEL is set)"
            return False
        name, flags = _flags()
        try:
            how = _build(name, flags, kernel_dir())
            _module = True
            _status = f"C++ kernel ({name}, {how})"
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
            first = first_line(e, 200)
            _status = f"torch fallback (C++ kernel unavailable: {first})"
            _say(f"{_status}; training continues with the eager formula")
            _module = False
    return bool(_module)


def status() -> str:
    """Which CPU implementation the fused op uses (building the kernel if needed)."""
    load()
    return _status or "unknown"
