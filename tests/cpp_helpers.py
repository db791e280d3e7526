"""Helpers for the tests that build and run the C++ runtime (cpp_runtime/README.md's commands)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "cpp_runtime" / "README.md"
TORCH_CMAKE = torch.utils.cmake_prefix_path
TORCH_LIB = Path(TORCH_CMAKE).parent.parent / "lib"  # what TorchConfig.cmake links: <torch>/lib
BUILD_TIMEOUT = 1200


def readme_blocks(lang: str) -> dict[str, list[str]]:
    """The README's code blocks in language `lang`, by section heading."""
    blocks = {}
    for section in re.split(r"^## ", README.read_text(), flags=re.M)[1:]:
        heading = section.splitlines()[0].strip()
        blocks[heading] = re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)
    return blocks


def tool_env(**extra) -> dict:
    """This environment, with this Python's bin/ (python, vaekit) first on PATH, as the README assumes."""
    env = dict(os.environ, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bash(script: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env or tool_env(),
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert res.returncode == 0, f"{script}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"
    return res


def need_toolchain():
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        if os.environ.get("VAEKIT_REQUIRE_CPP", "") not in ("", "0"):
            pytest.fail(f"VAEKIT_REQUIRE_CPP is set but {', '.join(missing)} is missing")
        pytest.skip(f"{', '.join(missing)} not installed")


