import json
import os
import subprocess
import sys
import textwrap

import pytest

import vaekit
from vaekit.manager import PluginManager

import plugin_for_tests


def test_builtins_are_registered_as_plugins(fresh_pm):
    assert fresh_pm.encoders.names() == ["conv", "mlp"]
    assert fresh_pm.decoders.names() == ["conv", "mlp"]
    assert fresh_pm.priors.names() == ["gaussian", "none"]
    assert fresh_pm.likelihoods.names() == ["bernoulli", "gaussian", "mcc"]
    assert fresh_pm.regularizers.names() == ["adversarial", "mmd", "sparsity"]
    assert set(fresh_pm.datasets.names()) >= {"mnist", "digits", "file"}
    assert all(info.source == "builtin" for reg in fresh_pm.registries.values() for info in reg)


def test_every_register_hook_fills_its_registry():
    """vaekit_register_encoders/_decoders/_priors/_likelihoods/_regularizers/_datasets from one plugin module."""
    pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
    assert "identity" in pm.encoders
    assert "linear" in pm.decoders
    assert "fixed" in pm.priors
    assert "nan_after" in pm.likelihoods
    assert {"code_l2", "tracker", "zero_half"} <= set(pm.regularizers.names())
    assert "tiny" in pm.datasets
    assert "plugin_for_tests" in pm.encoders.get("identity").source


def test_duplicate_plugin_name_across_plugins_is_an_error():
    class Clash:
        @vaekit.hookimpl
        def vaekit_register_encoders(self, registry):
            registry.register("conv", plugin_for_tests.Identity)

    with pytest.raises(ValueError, match="'conv' is registered twice: by 'builtin'"):
        PluginManager(extra_plugins=[Clash()], autoload=False)


def test_unknown_hook_in_a_plugin_is_rejected():
    class Typo:
        @vaekit.hookimpl
        def vaekit_register_encoder(self, registry):  # missing "s"
            pass

    with pytest.raises(Exception, match="vaekit_register_encoder"):
        PluginManager(extra_plugins=[Typo()], autoload=False)


THIRD_PARTY_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "vaekit-throwaway"
version = "0.3.1"

[project.entry-points.vaekit]
throwaway = "vaekit_throwaway"
"""

THIRD_PARTY_MODULE = '''
import torch
import vaekit


class HalfEncoder(vaekit.Encoder):
    """Averages pixel pairs, then one linear layer.

    :param width: output features.
    """

    def __init__(self, input_shape, *, width: int = 32):
        super().__init__(input_shape)
        n = 1
        for s in self.input_shape:
            n *= s
        self.lin = torch.nn.Linear(n, width)
        self.out_features = width

    def forward(self, x):
        return torch.relu(self.lin(x.flatten(1)))


@vaekit.hookimpl
def vaekit_register_encoders(registry):
    registry.register("throwaway", HalfEncoder)
'''


@pytest.fixture(scope="module")
def third_party_site(tmp_path_factory):
    """Build and install a throwaway distribution with a `vaekit` entry point into its own folder."""
    src = tmp_path_factory.mktemp("vaekit-throwaway")
    (src / "pyproject.toml").write_text(THIRD_PARTY_PYPROJECT)
    (src / "vaekit_throwaway.py").write_text(textwrap.dedent(THIRD_PARTY_MODULE))
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(site), str(src)],
        check=True, capture_output=True, text=True,
    )
    return site


def _cli(args, site, **env):
    environ = {k: v for k, v in os.environ.items() if k != "VAEKIT_DISABLE_PLUGIN_AUTOLOAD"}
    environ.update(PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-m", "vaekit", *args], capture_output=True, text=True, env=environ, timeout=300)


def test_third_party_entry_point_plugin_is_listed_and_trains(third_party_site, tmp_path):
    listing = _cli(["plugins", "--json"], third_party_site)
    assert listing.returncode == 0, listing.stderr
    encoders = {p["name"]: p for p in json.loads(listing.stdout)["encoder"]}
    assert encoders["throwaway"]["source"] == "vaekit-throwaway==0.3.1"
    assert encoders["throwaway"]["options"]["width"]["default"] == 32

    out = tmp_path / "run"
    run = _cli(["run", "--data", "mnist:train_per_class=10,test_per_class=2", "--encoder", "throwaway:width=16",
                "--decoder", "mlp:hidden=32", "--epochs", "1", "--latent-dim", "2", "--out", str(out), "-q"],
               third_party_site)
    assert run.returncode == 0, run.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["encoder"] == {"name": "throwaway", "options": {"width": 16}}
    assert config["plugin_sources"]["encoder"] == "vaekit-throwaway==0.3.1"
    assert (out / "model.safetensors").exists()


def test_autoload_can_be_disabled(third_party_site):
    res = _cli(["run", "--encoder", "throwaway"], third_party_site, VAEKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert res.returncode == 1
    assert res.stderr.strip() == "error: unknown encoder 'throwaway'; known encoders: conv, mlp"
