"""Shared fixtures: small slices of the real MNIST digits and one trained run."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))

# 30 training and 10 test digits per class: real data, seconds to train.
SMALL_MNIST = "mnist:train_per_class=30,test_per_class=10"


@pytest.fixture(scope="session")
def small_mnist():
    from vaekit.data import load_mnist5k

    return load_mnist5k(train_per_class=30, test_per_class=10)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small MLP VAE trained for 3 epochs on 300 real digits (shared, read-only)."""
    import vaekit

    out = tmp_path_factory.mktemp("runs") / "mlp-vae"
    result = vaekit.train(data=SMALL_MNIST, encoder="mlp:hidden=128", latent_dim=2, epochs=3,
                          batch_size=32, out=str(out), quiet=True)
    return result.run_dir


@pytest.fixture(scope="session")
def readme_build(trained_run, tmp_path_factory):
    """cpp_runtime/README.md's Build commands as written (run dir filled in), in a fresh directory holding
    cpp_runtime/: export model.pt, configure, build, ctest.  Built once per pytest run: tests/test_cpp_runtime.py
    runs the README's commands in it, tests/test_export.py uses its runner."""
    from cpp_helpers import ROOT, bash, need_toolchain, readme_blocks

    need_toolchain()
    work = tmp_path_factory.mktemp("readme")
    (work / "cpp_runtime").symlink_to(ROOT / "cpp_runtime")
    script = readme_blocks("bash")["Build"][0]
    assert "runs/<run>" in script
    bash(script.replace("runs/<run>", str(trained_run)), work)
    return work


def install_plugin_distribution(tmp_path, name: str, version: str, module: str, source: str):
    """Build and install a throwaway distribution ``name==version`` holding one module ``module``
    (``source``) with a ``vaekit`` entry point, as a third party's would be, into a new folder
    under ``tmp_path``; returns that folder (put it on PYTHONPATH)."""
    import subprocess
    import sys
    import textwrap

    src = tmp_path / f"{name}-src"
    src.mkdir()
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"

        [project.entry-points.vaekit]
        {module} = "{module}"
    """))
    (src / f"{module}.py").write_text(textwrap.dedent(source))
    site = tmp_path / f"{name}-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True, capture_output=True, text=True)
    return site


def run_cli(args, *sites, **env):
    """``python -m vaekit ARGS`` in a subprocess with ``sites`` on PYTHONPATH and entry points loaded."""
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "VAEKIT_DISABLE_PLUGIN_AUTOLOAD"}
    path = os.pathsep.join([str(s) for s in sites] + [os.environ.get("PYTHONPATH", "")])
    environ.update(PYTHONPATH=path, **env)
    return subprocess.run([sys.executable, "-m", "vaekit", *args], capture_output=True, text=True, env=environ,
                          timeout=600)


@pytest.fixture
def fresh_pm():
    """A plugin manager of built-ins only (no entry points)."""
    from vaekit.manager import PluginManager

    return PluginManager(autoload=False)

# The Triton kernels run on the CPU through Triton's interpreter when no GPU is present; this
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class PythonCalls:
    """The source files of the Python functions called inside a ``with`` block (``sys.setprofile``):
    to check that an op's path, autograd included, runs in C++ alone."""

    def __enter__(self):
        import sys

        self.files: list[str] = []
        self._previous = sys.getprofile()
        sys.setprofile(lambda frame, event, arg: self.files.append(frame.f_code.co_filename) if event == "call" else None)
        return self

    def __exit__(self, *exc):
        import sys

        sys.setprofile(self._previous)

    def under(self, *parts: str) -> list[str]:
        """The called files whose path contains one of ``parts``."""
        return sorted({f for f in self.files if any(p in f.replace("\\", "/") for p in parts)})
