"""Image conversion and PNG grids (Pillow).

Two layouts are accepted everywhere here, told apart by dtype:
- floating (torch or numpy) ``(B, C, H, W)`` in [-1, 1], C in {1, 3}: what the model and the data give;
- ``uint8`` numpy or torch ``(B, H, W, C)``, C in {1, 3}: what the pipeline returns.
The mapping between them is ``u8 = round((x + 1) / 2 * 255)`` (values outside [-1, 1] are clipped).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from latteflow.core.files import atomic_write

__all__ = ["from_uint8", "make_grid", "save_image_grid", "to_uint8"]


def to_uint8(images) -> np.ndarray:
    """``uint8`` numpy ``(B, H, W, C)`` from either accepted layout (uint8 input is returned as a copy)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D (B, C, H, W) float or (B, H, W, C) uint8, got shape {images.shape}")
    if images.dtype == np.uint8:
        if images.shape[3] not in (1, 3):
            raise ValueError(f"uint8 images must be (B, H, W, C) with C in (1, 3), got shape {images.shape}")
        return images.copy()
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be uint8 or floating, got dtype {images.dtype}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"float images must be (B, C, H, W) with C in (1, 3), got shape {images.shape}")
    if not np.isfinite(images).all():
        raise ValueError("images hold NaN or inf")
    x = np.clip((images.astype(np.float64) + 1.0) * 127.5, 0.0, 255.0)
    return np.ascontiguousarray(np.rint(x).astype(np.uint8).transpose(0, 2, 3, 1))


def from_uint8(images) -> torch.Tensor:
    """float32 torch ``(B, C, H, W)`` in [-1, 1] from either accepted layout (float input passes through as float32)."""
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point or (
            isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating)):
        x = torch.as_tensor(images).detach().to("cpu", torch.float32)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"float images must be (B, C, H, W) with C in (1, 3), got shape {tuple(x.shape)}")
        return x
    u8 = to_uint8(images)
    return torch.from_numpy(u8.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def make_grid(images, *, ncols: int | None = None, scale: int = 8, padding: int = 1,
              pad_value: int = 128) -> np.ndarray:
    """One ``uint8`` ``(H, W, C)`` picture holding the images row by row, ``ncols`` per row (default
    ``ceil(sqrt(B))``), each upscaled ``scale`` times by pixel repetition and framed by ``padding`` pixels
    of grey ``pad_value``."""
    u8 = to_uint8(images)
    b, h, w, c = u8.shape
    if b == 0:
        raise ValueError("images must hold at least one image")
    for name, v, lo in (("scale", scale, 1), ("padding", padding, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if isinstance(pad_value, bool) or not isinstance(pad_value, int) or not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be an int in 0..255, got {pad_value!r}")
    if ncols is None:
        ncols = math.ceil(math.sqrt(b))
    elif isinstance(ncols, bool) or not isinstance(ncols, int) or ncols <= 0:
        raise ValueError(f"ncols must be a positive int, got {ncols!r}")
    ncols = min(ncols, b)
    nrows = math.ceil(b / ncols)
    up = u8.repeat(scale, axis=1).repeat(scale, axis=2)
    ch, cw = h * scale, w * scale
    grid = np.full((padding + nrows * (ch + padding), padding + ncols * (cw + padding), c), pad_value, np.uint8)
    for i in range(b):
        r, q = divmod(i, ncols)
        y, x = padding + r * (ch + padding), padding + q * (cw + padding)
        grid[y:y + ch, x:x + cw] = up[i]
    return grid


def save_image_grid(images, path: str | os.PathLike, *, ncols: int | None = None, scale: int = 8,
                    padding: int = 1, pad_value: int = 128) -> Path:
    """Write ``make_grid(images, ...)`` as a PNG at ``path`` (atomically); returns the path."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"path must end in .png, got {str(path)!r}")
    grid = make_grid(images, ncols=ncols, scale=scale, padding=padding, pad_value=pad_value)
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)  # uint8 2-D -> "L", (H, W, 3) -> "RGB"
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return path
