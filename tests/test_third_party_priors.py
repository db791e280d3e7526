"""Priors from third-party packages, written from the docs alone: a VampPrior (the docs/plugins.md
worked example, which needs the composed model through ``bind``) and a mixture of Gaussians.
Each trains, samples (seeded, reproducible), evaluates and exports from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import install_plugin_distribution, run_cli

ROOT = Path(__file__).resolve().parent.parent
DATA = "mnist:train_per_class=10,test_per_class=3"

MOG_MODULE = '''
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import vaekit


class MixturePrior(vaekit.Prior):
    """p(z) = Σ_k π_k N(μ_k, diag σ_k²) with learned weights, means and scales; diagonal-Gaussian posterior.

    :param k: number of components.
    """

    def __init__(self, latent_dim, *, k: int = 5):
        super().__init__(latent_dim)
        self.param_dim = 2 * self.latent_dim
        self.logits = torch.nn.Parameter(torch.zeros(k))
        self.means = torch.nn.Parameter(torch.randn(k, self.latent_dim))
        self.log_scales = torch.nn.Parameter(torch.zeros(k, self.latent_dim))

    def posterior(self, params):
        mu, logvar = params.chunk(2, dim=-1)
        return Independent(Normal(mu, torch.exp(0.5 * logvar.clamp(-30, 30))), 1)

    def distribution(self):
        return MixtureSameFamily(Categorical(logits=self.logits),
                                 Independent(Normal(self.means, self.log_scales.exp()), 1))


@vaekit.hookimpl
def vaekit_register_priors(registry):
    registry.register("mog", MixturePrior)
'''


def vamp_module() -> str:
    """The VampPrior exactly as docs/plugins.md shows it."""
    doc = (ROOT / "docs" / "plugins.md").read_text()
    match = re.search(r"```python\n# vaekit_vamp.py\n(.*?)```", doc, re.DOTALL)
    assert match, "docs/plugins.md lost its VampPrior example"
    return match.group(1)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("priors")
    return (install_plugin_distribution(tmp, "vaekit-vamp", "0.1.0", "vaekit_vamp", vamp_module()),
            install_plugin_distribution(tmp, "vaekit-mog", "0.2.0", "vaekit_mog", MOG_MODULE))


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
@pytest.mark.parametrize("prior,source", [("vamp:k=8", "vaekit-vamp==0.1.0"), ("mog:k=4", "vaekit-mog==0.2.0")])
def test_third_party_prior_trains_samples_evaluates_and_exports(sites, tmp_path, prior, source):
    run = tmp_path / "run"
    res = run_cli(["run", "--data", DATA, "--encoder", "mlp:hidden=32", "--latent-dim", "2", "--prior", prior,
                   "--epochs", "2", "--out", str(run), "-q"], *sites)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr  # every figure written, no warning
    assert (run / "samples.png").exists() and (run / "manifold.png").exists()
    assert json.loads((run / "config.json").read_text())["plugin_sources"]["prior"] == source

    pngs = []
    for seed in (3, 3, 4):
        out = tmp_path / f"s{len(pngs)}.png"
        res = run_cli(["sample", str(run), "-n", "16", "--seed", str(seed), "--out", str(out)], *sites)
        assert res.returncode == 0, res.stderr
        pngs.append(_png(out))
    assert np.array_equal(pngs[0], pngs[1]) and not np.array_equal(pngs[0], pngs[2])  # seeded, reproducible

    res = run_cli(["eval", str(run), "--json", "-k", "20"], *sites)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["elbo"] == pytest.approx(last["test_elbo"], abs=1e-4)
    assert metrics["nll"] <= -metrics["elbo"] + 1.0  # the importance-sampled bound is at least as tight

    # export refuses what it cannot carry, up front and by name, or leaves sample() out when asked
    name = prior.split(":")[0]
    res = run_cli(["export", str(run), "--out", str(tmp_path / "m.pt")], *sites)
    assert res.returncode == 1 and not (tmp_path / "m.pt").exists(), res.stderr
    assert res.stderr.startswith(f"error: cannot export sampling from the prior {name!r}"), res.stderr
    res = run_cli(["export", str(run), "--out", str(tmp_path / "m.pt"), "--no-sampling"], *sites)
    assert res.returncode == 0, res.stderr
    from vaekit import load_exported

    exported = load_exported(tmp_path / "m.pt")
    assert not exported.can_sample and not exported.deterministic
    with pytest.raises(Exception, match=f"exported without sampling \\(--no-sampling\\): its prior {name!r} is not N"):
        exported.sample(2, 0)

    # without the package installed, the run says which distribution to install
    for args in (["sample", str(run), "-n", "4", "--out", str(tmp_path / "x.png")], ["run", "--resume", str(run), "--epochs", "3"]):
        res = run_cli(args)
        assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"which is not installed here: pip install {source}" in res.stderr, res.stderr


def test_contract_checks_bind_third_party_priors_into_a_model(sites, monkeypatch):
    """vaekit.testing.check_prior composes the prior into a model, so a prior that needs the encoder
    (the VampPrior) is checked honestly: bound, one training step, seeded sampling, export."""
    import importlib

    from vaekit.manager import PluginManager
    from vaekit.testing import check_prior

    for site in sites:
        monkeypatch.syspath_prepend(str(site))
    modules = [importlib.import_module(m) for m in ("vaekit_vamp", "vaekit_mog")]
    pm = PluginManager(extra_plugins=modules, autoload=False)
    for name in ("vamp", "mog"):
        prior = check_prior(pm.priors.get(name))
        assert prior.stochastic
