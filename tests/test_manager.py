import json

import pytest

import vaekit
from vaekit.manager import PluginManager

import plugin_for_tests
from conftest import install_plugin_distribution, run_cli


def test_builtins_are_registered_as_plugins(fresh_pm):
    assert fresh_pm.encoders.names() == ["conv", "linear", "mlp"]
    assert fresh_pm.decoders.names() == ["conv", "linear", "mlp"]
    assert fresh_pm.priors.names() == ["gaussian", "none"]
    assert fresh_pm.likelihoods.names() == ["bernoulli", "gaussian", "mcc"]
    assert fresh_pm.regularizers.names() == ["adversarial", "contractive", "denoising", "ksparse", "mmd", "sparsity"]
    assert fresh_pm.objectives.names() == ["elbo", "iwae"]
    assert set(fresh_pm.datasets.names()) >= {"mnist", "digits", "file"}
    assert all(info.source == "builtin" for reg in fresh_pm.registries.values() for info in reg)


def test_every_register_hook_fills_its_registry():
    """vaekit_register_encoders/_decoders/_priors/_likelihoods/_regularizers/_objectives/_datasets from one plugin module."""
    pm = PluginManager(extra_plugins=[plugin_for_tests], autoload=False)
    assert "identity" in pm.encoders
    assert "affine" in pm.decoders
    assert "fixed" in pm.priors
    assert "nan_after" in pm.likelihoods
    assert {"code_l2", "tracker", "zero_half"} <= set(pm.regularizers.names())
    assert "recon_only" in pm.objectives
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
    """A throwaway distribution with a `vaekit` entry point, installed into its own folder."""
    return install_plugin_distribution(tmp_path_factory.mktemp("tp"), "vaekit-throwaway", "0.3.1",
                                       "vaekit_throwaway", THIRD_PARTY_MODULE)


def _cli(args, site, **env):
    return run_cli(args, site, **env)


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
    assert res.stderr.strip() == "error: unknown encoder 'throwaway'; known encoders: conv, linear, mlp"
