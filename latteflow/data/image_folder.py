"""An ImageNet-layout image folder (one sub-folder per class) and the ADM centre crop (SPEC 3.2).

``scan_image_folder`` lists the files, ``load_image`` reads one with Pillow (any mode, converted to RGB),
``adm_center_crop`` crops and resizes it the way ADM (guided diffusion) prepares ImageNet: halve with a box
filter while the short side is at least twice the target, resize with bicubic so the short side equals the
target, then cut the centre square. ``to_model_pixels`` maps uint8 RGB to float ``(3, H, W)`` in [-1, 1].
"""
from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
import torch

__all__ = ["adm_center_crop", "load_image", "scan_image_folder", "to_model_pixels", "to_rgb"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def scan_image_folder(images: str | os.PathLike) -> Tuple[List[str], List[Tuple[str, int]], List[List[str]]]:
    """``(classes, files, ignored)`` of an ImageNet-layout folder: ``classes`` the sorted sub-folder names,
    ``files`` every non-hidden file under them as ``(path relative to images, class index)`` sorted by path,
    ``ignored`` the ``[path, reason]`` of files lying directly in ``images`` (outside any class).
    ValueError naming ``--images`` when it is not a folder or has no class folder, and naming the class
    folder when one holds no file."""
    root = os.path.abspath(os.fspath(images))
    if not os.path.isdir(root):
        raise ValueError(f"--images {os.fspath(images)!r} is not a folder")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    ignored = [[os.path.join(root, e), "not inside a class folder"] for e in entries if e not in classes]
    if not classes:
        raise ValueError(f"--images {os.fspath(images)!r} has no class folders (expected one sub-folder per class)")
    files: List[Tuple[str, int]] = []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if not f.startswith(".")]
        if not found:
            raise ValueError(f"--images: class folder {os.path.join(root, name)!r} holds no files")
        files += [(p.replace(os.sep, "/"), label) for p in sorted(found)]
    return classes, files, ignored


def to_rgb(img):
    """A Pillow image in mode RGB: palette and transparent images through RGBA (alpha dropped, as ADM's
    ``convert("RGB")``), 16-bit grey scaled to 8 bits (Pillow would clip it), everything else by ``convert``."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.rint(a).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_image(path: str | os.PathLike):
    """The image at ``path`` fully decoded, in mode RGB. Raises whatever Pillow raises on a bad file
    (``prepare`` records that as a skipped image)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def adm_center_crop(img, resolution: int):
    """The ADM crop of a Pillow image to ``resolution x resolution`` (RGB in, RGB out)."""
    from PIL import Image

    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if min(img.size) < 1:
        raise ValueError(f"image has no pixels ({img.size[0]}x{img.size[1]})")
    while min(img.size) >= 2 * resolution:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = resolution / min(img.size)
    size = tuple(max(resolution, round(s * scale)) for s in img.size)
    img = img.resize(size, resample=Image.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def to_model_pixels(img) -> torch.Tensor:
    """float32 ``(3, H, W)`` in [-1, 1] from an RGB Pillow image (``x = u8 / 127.5 - 1``)."""
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"image must be RGB (H, W, 3), got shape {a.shape}")
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
