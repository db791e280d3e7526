"""Contract tests parametrized over every registered plugin (built-ins and installed third-party ones)."""

import numpy as np
import pytest

from vaekit.manager import get_plugin_manager
from vaekit.testing import CHECKS

PM = get_plugin_manager()
ALL = [(kind, info.name) for kind, reg in PM.registries.items() for info in reg]


@pytest.mark.parametrize("kind,name", ALL, ids=[f"{k}-{n}" for k, n in ALL])
def test_plugin_contract(kind, name, tmp_path):
    info = PM.registries[kind].get(name)
    if kind == "dataset" and name == "file":
        path = tmp_path / "x.npy"
        np.save(path, np.random.default_rng(0).integers(0, 256, (20, 8, 8), dtype=np.uint8))
        bundle = CHECKS[kind](info, path=str(path))
        assert bundle.shape == (1, 8, 8)
    elif kind == "regularizer" and name == "ksparse":
        assert CHECKS[kind](info).k == 4  # the default k = min(25, latent-dim) fits any code
        assert CHECKS[kind](info, latent_dim=32).k == 25
    else:
        CHECKS[kind](info)


@pytest.mark.parametrize("name", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 8, 12), (1, 8, 8)])
def test_encoder_decoder_pairs_on_image_shapes(name, shape):
    CHECKS["encoder"](PM.encoders.get(name), shape)
    CHECKS["decoder"](PM.decoders.get(name), 3, shape)


def test_mlp_on_vectors():
    CHECKS["encoder"](PM.encoders.get("mlp"), (20,))
    CHECKS["decoder"](PM.decoders.get("mlp"), 3, (40,))
    CHECKS["likelihood"](PM.likelihoods.get("gaussian"), (20,))


@pytest.mark.parametrize("options", [{"covariance": "full"}, {"covariance": "full", "latent_dim": 1},
                                     {"fused": False}], ids=["full", "full-d1", "unfused"])
def test_gaussian_prior_options_contract(options):
    """The gaussian prior's non-default options keep the prior contract (a full covariance with any d,
    including d = 1 without off-diagonal entries)."""
    prior = CHECKS["prior"](PM.priors.get("gaussian"), **options)
    d = prior.latent_dim
    assert prior.param_dim == 2 * d + (d * (d - 1) // 2 if options.get("covariance") == "full" else 0)
