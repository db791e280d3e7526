"""Compile every Triton kernel under vaekit/ offline for real CUDA targets (no GPU needed).

``python tests/compile_triton_kernels.py`` compiles each kernel listed in a module's ``KERNELS``
tuple through ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80 and
sm_90, with float32, float16 and bfloat16 pointers (or the dtypes of a module's ``COMPILE_DTYPES``), down to a cubin, and prints one line per
compile.  The interpreter (``TRITON_INTERPRET=1``) runs kernels as Python and misses what only
the compiler enforces (e.g. non-constexpr globals), so this must run without it: tests/test_ops.py
runs this file in a subprocess with ``TRITON_INTERPRET`` removed.  Exit code 1 on any failure.

It also checks that every ``@triton.jit`` function in vaekit is an entry point in ``KERNELS`` or
called by one, so a new kernel cannot escape the check.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
import tempfile

import torch

TARGETS = (80, 90)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def triton_modules():
    """vaekit's modules whose source uses ``@triton.jit``."""
    import vaekit

    for info in pkgutil.walk_packages(vaekit.__path__, "vaekit."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, encoding="utf-8") as f:
                if "@triton.jit" in f.read():
                    yield importlib.import_module(info.name)


def signature(module, kernel, dtype: torch.dtype, d: int = 64) -> tuple[dict, dict]:
    """Triton signature and constexprs of ``kernel`` for inputs of ``dtype``: ``*_ptr`` arguments are
    pointers (``kl``/``gkl`` in the module's compute dtype), other runtime arguments int32 unless the module's
    ``SCALAR_TYPES`` names their type (``{"seed": "i64"}``)."""
    from vaekit.ops.reference import compute_dtype

    consts = module.constexprs(dtype, d)
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("kl_ptr"):
            sig[name] = "*" + TRITON_TYPES[compute_dtype(dtype)]
        elif name.endswith("_ptr"):
            sig[name] = "*" + TRITON_TYPES[dtype]
        else:
            sig[name] = getattr(module, "SCALAR_TYPES", {}).get(name, "i32")
    return sig, {(kernel.arg_names.index(n),): v for n, v in consts.items()}


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter does not compile kernels", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="vaekit-triton-"))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = compiled = 0
    for module in triton_modules():
        jitted = {n: f for n, f in vars(module).items() if isinstance(f, triton.runtime.JITFunction)}
        entry = {k.__name__ for k in module.KERNELS}
        called = {n for k in module.KERNELS for n in jitted if re.search(rf"\b{n}\(", k.src)}
        for name in sorted(set(jitted) - entry - called):
            print(f"FAIL {module.__name__}.{name}: @triton.jit but neither in KERNELS nor called by a kernel")
            failures += 1
        for kernel in module.KERNELS:
            for cc in TARGETS:
                for dtype in getattr(module, "COMPILE_DTYPES", DTYPES):
                    sig, consts = signature(module, kernel, dtype)
                    what = f"{module.__name__}.{kernel.__name__} sm_{cc} {TRITON_TYPES[dtype]}"
                    try:
                        out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                             target=GPUTarget("cuda", cc, 32))
                        assert out.asm.get("cubin"), "no cubin produced"
                        print(f"ok   {what}: {len(out.asm['ptx'])} chars of PTX, {len(out.asm['cubin'])} bytes of cubin")
                        compiled += 1
                    except Exception as e:  # noqa: BLE001 - report every failing combination
                        print(f"FAIL {what}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
                        failures += 1
    print(f"{compiled} compiled, {failures} failed")
    return 1 if failures or not compiled else 0


if __name__ == "__main__":
    sys.exit(main())
