"""PNG grids and the float <-> uint8 mapping."""
import numpy as np
import pytest
import torch
from PIL import Image

from latteflow.data.images import from_uint8, make_grid, save_image_grid, to_uint8


def test_uint8_mapping_round_trips():
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5)
    u = to_uint8(x)
    assert u.shape == (1, 1, 5, 1) and u.dtype == np.uint8
    assert u.ravel().tolist() == [0, 64, 128, 255, 255]  # 2.0 is clipped
    back = from_uint8(u)
    assert back.shape == (1, 1, 1, 5)
    assert (back[..., :4] - x[..., :4]).abs().max() <= 1 / 255 + 1e-6  # half a quantisation step
    rgb = to_uint8(np.zeros((2, 3, 4, 5), np.float32))
    assert rgb.shape == (2, 4, 5, 3)


def test_grid_layout_and_upscaling():
    x = -torch.ones(5, 1, 8, 8)
    x[2, 0, 3, 4] = 1.0  # one white pixel in image 2 (row 0, col 2 of a 3-wide grid)
    g = make_grid(x, ncols=3, scale=4, padding=1)
    assert g.shape == (1 + 2 * 33, 1 + 3 * 33, 1) and g.dtype == np.uint8
    y0, x0 = 1 + 3 * 4, 1 + 2 * 33 + 4 * 4
    assert (g[y0:y0 + 4, x0:x0 + 4] == 255).all()  # the pixel became a 4x4 block
    assert (g == 255).sum() == 16
    assert (g[0] == 128).all() and (g[:, 33] == 128).all()  # frame
    assert (g[34:67, 67:100] == 128).all()  # the missing sixth cell is padding


def test_png_written_and_readable(tmp_path):
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_image_grid(x, tmp_path / "out" / "grid.png", ncols=5)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (1 + 5 * 65, 1 + 2 * 65)
        arr = np.asarray(im)
    expect = to_uint8(x)[8, :, :, 0].repeat(8, 0).repeat(8, 1)  # image 8 sits at row 1, column 3
    assert np.array_equal(arr[66:130, 1 + 3 * 65:1 + 3 * 65 + 64], expect)
    u8 = np.zeros((3, 8, 8, 3), np.uint8)
    u8[..., 0] = 200
    p2 = save_image_grid(u8, tmp_path / "rgb.png")
    with Image.open(p2) as im:
        assert im.mode == "RGB" and im.size == (1 + 2 * 65, 1 + 2 * 65)
        assert im.getpixel((5, 5)) == (200, 0, 0)


def test_bad_arguments(tmp_path):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="path"):
        save_image_grid(x, tmp_path / "grid.jpg")
    with pytest.raises(ValueError, match="images"):
        to_uint8(torch.zeros(2, 8, 8, 1))  # float must be (B, C, H, W)
    with pytest.raises(ValueError, match="images"):
        to_uint8(torch.zeros(8, 8))
    with pytest.raises(TypeError, match="images"):
        to_uint8([[0.0]])
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="scale"):
        make_grid(x, scale=0)
    with pytest.raises(ValueError, match="ncols"):
        make_grid(x, ncols=0)
