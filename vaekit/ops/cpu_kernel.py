"""The vectorised C++ CPU kernels of the fused op, compiled on first use and cached.

``torch.utils.cpp_extension.load`` builds ``csrc/reparameterize_kl.cpp`` against the installed
torch (about 30 s on 2 cores, once; cached under ``torch.utils.cpp_extension.get_default_build_root()``)
and loads it as a library whose ``TORCH_LIBRARY_IMPL(vaekit, CPU, …)`` registers the CPU kernels
of ``vaekit::reparameterize_kl`` and its backward, so CPU calls never pass through Python.
Where that is impossible (no C++ compiler or ninja, or ``VAEKIT_DISABLE_CPP_KERNEL=1``) the ops
keep their eager implementation and :func:`status` says why.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
import torch

SOURCE = Path(__file__).parent / "csrc" / "reparameterize_kl.cpp"
_lock = threading.Lock()
_module: bool = False
_status: str | None = None


def _flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags for this CPU: AVX2 (with Sleef exp) where the CPU has it."""
    flags = ["-O3"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
        tag = "avx2"
    else:
        tag = "default"
    return f"vaekit_reparameterize_kl_{tag}", flags


def _ninja_on_path() -> None:
    """torch's JIT build runs ``ninja`` from PATH; the ``ninja`` wheel's binary may not be on it (an
    unactivated virtual environment), so add its folder."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass


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
            return None
        name, flags = _flags()
        _ninja_on_path()
        try:
            from torch.utils.cpp_extension import get_default_build_root
            from torch.utils.cpp_extension import load as load_extension

            root = Path(get_default_build_root())
            if not any(root.glob(f"*/{name}/{name}.so")):
                print(f"vaekit: compiling the fused CPU kernel (first use only, cached in {root})",
                      file=sys.stderr, flush=True)
            load_extension(name=name, sources=[str(SOURCE)], extra_cflags=flags, is_python_module=False, verbose=False)
            _module = True
            _status = f"C++ kernel ({name})"
        except Exception as e:  # noqa: BLE001 - any build failure means: use the fallback
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            _status = f"torch fallback (C++ kernel unavailable: {first})"
            print(f"vaekit: {_status}", file=sys.stderr, flush=True)
            _module = False
    return bool(_module)


def status() -> str:
    """Which CPU implementation the fused op uses (building the kernel if needed)."""
    load()
    return _status or "unknown"
