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
