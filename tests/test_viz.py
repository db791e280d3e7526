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
