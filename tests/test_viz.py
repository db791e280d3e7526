import numpy as np
import torch

from vaekit.viz import as_images, image_grid, save_grid


def test_image_grid_layout():
    images = np.stack([np.full((2, 3), i, dtype=np.float32) for i in range(5)])
    grid = image_grid(images, nrow=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1)
    assert grid[1, 1] == 0 and grid[1, 5] == 1 and grid[4, 1] == 2 and grid[7, 1] == 4
    assert grid[7, 5] == 1.0  # the empty sixth cell stays background


def test_as_images_handles_vectors_and_rgb():
    assert as_images(torch.rand(4, 784)).shape == (4, 28, 28)
    assert as_images(torch.rand(4, 3, 8, 8)).shape == (4, 8, 8, 3)
    assert as_images(torch.rand(4, 10)) is None


def test_save_grid_writes_png(tmp_path):
    assert save_grid(torch.rand(9, 1, 8, 8), tmp_path / "g.png", nrow=3)
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert not save_grid(torch.rand(9, 10), tmp_path / "v.png")


def test_samples_png_shows_what_vaekit_sample_and_the_export_draw(trained_run, tmp_path, monkeypatch):
    """samples.png draws z from a CPU generator seeded 0: the same samples as `vaekit sample --seed 0`
    (VAEModel.sample with that generator) and the exported sample(n, 0), on any device."""
    import vaekit
    from vaekit import viz
    from vaekit.export import export_torchscript, load_exported

    model = vaekit.load_run(trained_run)
    shown = []
    monkeypatch.setattr(viz, "save_grid", lambda x, path, **kw: shown.append(x) or True)
    viz.plot_samples(model, tmp_path / "samples.png", n=16, seed=0)
    with torch.no_grad():
        expected = model.sample(16, torch.Generator().manual_seed(0))
    exported = load_exported(export_torchscript(model, tmp_path / "m.pt")).sample(16, 0)
    assert torch.allclose(shown[0], expected, atol=1e-6) and torch.allclose(shown[0], exported, atol=1e-6)


def test_figures_of_a_prior_that_only_has_a_sampler(tmp_path, capsys):
    """A prior that overrides sample() and has no distribution() still gets samples.png (can_sample does
    not need p(z) as a distribution), and nothing warns."""
    from vaekit import viz
    from vaekit.data import DataBundle
    from vaekit.plugins.priors import GaussianPrior
    from vaekit.testing import composed_model

    class SamplerOnly(GaussianPrior):
        def distribution(self):
            raise NotImplementedError("no closed form")

        def rsample_kl(self, params):
            return super().rsample_kl(params)

        def sample(self, n, generator=None):
            return torch.randn(n, self.latent_dim, generator=generator)

    model = composed_model(SamplerOnly(2), latent_dim=2, data_shape=(1, 6, 6))
    x = torch.rand(8, 1, 6, 6)
    written = viz.write_run_figures(tmp_path, model, DataBundle("t", x, x), x, [])
    assert "samples.png" in written and "manifold.png" in written
    assert capsys.readouterr().err == ""


def _captured_grids(monkeypatch):
    """Replace viz.save_grid by a recorder of the tensors handed to it (file name → tensor)."""
    from vaekit import viz

    shown = {}
    monkeypatch.setattr(viz, "save_grid", lambda x, path, **kw: shown.__setitem__(path.name, x.clone()) or True)
    return shown


def _built(encoder, data_shape, regularizers=()):
    from vaekit.config import RunConfig
    from vaekit.manager import PluginManager
    from vaekit.model import build_model

    config = RunConfig(encoder=encoder, prior="none", latent_dim=3, regularizers=list(regularizers))
    return build_model(config, data_shape, PluginManager(autoload=False))


def test_filters_png_tiles_are_the_mlp_encoders_first_layer_weights(tmp_path, monkeypatch):
    """filters.png shows row j of the first Linear's weight [F, D] as an 8x8 image, scaled so 0 is grey:
    0.5 + w / (2 max|w_j|) (computed here from the weight itself); a conv encoder and vectors that are
    not square images get none."""
    from vaekit import viz
    from vaekit.data import DataBundle

    model = _built("mlp:hidden=12,5", (1, 8, 8))
    x = torch.rand(10, 1, 8, 8)
    shown = _captured_grids(monkeypatch)
    written = viz.write_run_figures(tmp_path, model, DataBundle("t", x, x), x, [])
    assert "filters.png" in written
    w = model.encoder.net[0].weight.detach()  # [12, 64]: the first layer, on the flattened image
    expected = 0.5 + 0.5 * w / w.abs().max(dim=1, keepdim=True).values
    tiles = shown["filters.png"]
    assert tiles.shape == (12, 1, 8, 8)
    assert torch.allclose(tiles.reshape(12, 64), expected, atol=1e-6)
    extreme = (tiles.flatten(1).amax(1) == 1) | (tiles.flatten(1).amin(1) == 0)
    assert tiles.min() >= 0 and tiles.max() <= 1 and bool(extreme.all())  # each tile spans its own scale

    monkeypatch.undo()  # the real save_grid from here on
    conv = _built("conv:channels=4,hidden=8", (1, 8, 8))
    assert viz.first_layer_filters(conv) is None
    (tmp_path / "c").mkdir()
    assert "filters.png" not in viz.write_run_figures(tmp_path / "c", conv, DataBundle("t", x, x), x, [])
    vectors = _built("mlp:hidden=6", (10,))
    assert viz.first_layer_filters(vectors) is not None  # the weights exist, but a 10-vector is no image
    assert not viz.plot_filters(vectors, tmp_path / "v.png") and not (tmp_path / "v.png").exists()


def test_codes_png_is_the_histogram_of_the_codes_of_runs_with_sparse_codes(tmp_path, monkeypatch):
    """A regularizer with sparse_codes = True gives codes.png, a histogram of model.embed on the test data
    (all N x d entries); a run without one gets none."""
    from vaekit import viz
    from vaekit.data import DataBundle
    from vaekit.interfaces import Regularizer

    class Sparse(Regularizer):
        name = "sparse_for_tests"
        sparse_codes = True

        def transform_latent(self, z):
            return torch.relu(z)  # codes with exact zeros

    assert Regularizer.sparse_codes is False
    model = _built("mlp:hidden=12", (1, 8, 8))
    model.regularizers.append(Sparse(3, (1, 8, 8)))
    x = torch.rand(20, 1, 8, 8)
    histogrammed = []
    monkeypatch.setattr(viz, "plot_code_histogram", lambda codes, path: histogrammed.append(codes))
    assert "codes.png" in viz.write_run_figures(tmp_path, model, DataBundle("t", x, x), x, [])
    with torch.no_grad():
        expected = torch.relu(model.prior.mean(model.head(model.encoder(x))))
    assert torch.equal(histogrammed[0], expected) and (expected == 0).any()

    monkeypatch.undo()
    written = viz.write_run_figures(tmp_path, model, DataBundle("t", x, x), x, [])
    assert "codes.png" in written and (tmp_path / "codes.png").read_bytes()[:4] == b"\x89PNG"
    plain = _built("mlp:hidden=12", (1, 8, 8))
    (tmp_path / "p").mkdir()
    assert "codes.png" not in viz.write_run_figures(tmp_path / "p", plain, DataBundle("t", x, x), x, [])


def _decoder_inputs(model):
    """Record every code the decoder reads: a list of ``[B, d]`` tensors."""
    seen = []
    model.decoder.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
    return seen


def test_interpolation_decodes_straight_lines_between_the_codes_of_two_classes(trained_run, small_mnist, tmp_path):
    """Each row of interpolation.png decodes evenly spaced points of the segment between the posterior means
    of two test digits of different classes (first of class c, first of the next class), endpoints included."""
    import vaekit
    from vaekit import viz

    model = vaekit.load_run(trained_run)
    x, y = small_mnist.test_x, small_mnist.test_y
    seen = _decoder_inputs(model)
    assert viz.plot_interpolation(model, x, y, tmp_path / "i.png", pairs=4, steps=6)
    codes = seen[-1].view(4, 6, -1)  # [pairs, steps, d]
    for row, (a, b) in enumerate(viz._pair_indices(y, len(x), 4)):
        assert int(y[a]) != int(y[b]) and a == int((y == y[a]).nonzero()[0])
        with torch.no_grad():
            mu_a, mu_b = model.code(x[a : a + 1])[0], model.code(x[b : b + 1])[0]
        line = torch.stack([mu_a + t * (mu_b - mu_a) for t in torch.linspace(0, 1, 6)])
        assert torch.allclose(codes[row], line, atol=1e-5), row
    assert (tmp_path / "i.png").read_bytes()[:4] == b"\x89PNG"


def test_traversal_sweeps_one_unit_over_three_prior_standard_deviations(trained_run, small_mnist, tmp_path, monkeypatch):
    """Row j of traversal.png varies unit j alone, from −3 to 3 for the N(0, I) prior, the other units at the
    first test digit's posterior mean; a model with more than TRAVERSAL_MAX_DIM units gets none; a p(z)
    without a closed-form mean and stddev gets m ± 3σ estimated from 2,000 draws."""
    import vaekit
    from vaekit import viz
    from vaekit.testing import composed_model

    model = vaekit.load_run(trained_run)
    x = small_mnist.test_x
    seen = _decoder_inputs(model)
    assert viz.plot_traversal(model, x, tmp_path / "t.png", steps=7)
    with torch.no_grad():
        base = model.code(x[:1])[0]
    z = seen[-1].view(model.latent_dim, 7, -1)
    for j in range(model.latent_dim):
        others = [k for k in range(model.latent_dim) if k != j]
        assert torch.allclose(z[j][:, others], base[others].expand(7, -1))
        sweep = z[j][:, j]
        assert torch.allclose(sweep, torch.linspace(-3, 3, 7), atol=1e-6), sweep
    from torch.distributions import AffineTransform, Independent, Normal, TransformedDistribution

    # p(z) = 1 + 2 N(0, I) as a TransformedDistribution, which has no closed-form mean or stddev
    shifted = TransformedDistribution(Independent(Normal(torch.zeros(2), torch.ones(2)), 1),
                                      [AffineTransform(1.0, 2.0, event_dim=1)])
    monkeypatch.setattr(type(model.prior), "distribution", lambda self: shifted)
    m, sd, what = viz.latent_scale(model, x)
    # seen (seeds 0-2): m within 0.06 of 1, σ within 0.03 of 2 (2,000 seeded draws)
    assert what == "p(z)" and torch.allclose(m, torch.ones(2), atol=0.15) and torch.allclose(sd, torch.full((2,), 2.0), atol=0.15)
    wide = composed_model(latent_dim=viz.TRAVERSAL_MAX_DIM + 1)
    assert not viz.plot_traversal(wide, torch.rand(4, *wide.data_shape), tmp_path / "w.png")
    assert not (tmp_path / "w.png").exists()
