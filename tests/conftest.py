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


@pytest.fixture
def fresh_pm():
    """A plugin manager of built-ins only (no entry points)."""
    from vaekit.manager import PluginManager

    return PluginManager(autoload=False)

# The Triton kernels run on the CPU through Triton's interpreter when no GPU is present; this
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
