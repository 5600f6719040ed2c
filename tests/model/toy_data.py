"""What a user brings to `latteflow prepare`, at toy size and offline: a DC-AE folder written by
``save_pretrained`` (random weights) and an ImageNet-layout image folder drawn with Pillow.

Imported as ``import toy_data`` (tests/model is on sys.path through its conftest); the pytest fixtures
``toy_dcae_folder`` and ``toy_image_folder`` in tests/model/conftest.py call these; ``toy_backbone``'s
prepare folder (the ``toy_prepared`` fixture) encodes with the same ``write_toy_dcae``."""
from __future__ import annotations

import os

# 4x downsampling (three stages), 4 latent channels: a 16x16 image -> a 4x4x4 latent
TOY_DCAE_CONFIG = dict(in_channels=3, latent_channels=4, attention_head_dim=4,
                       encoder_block_types=("ResBlock", "ResBlock", "ResBlock"),
                       decoder_block_types=("ResBlock", "ResBlock", "ResBlock"),
                       encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
                       encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
                       encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()),
                       scaling_factor=0.5)
TOY_DOWNSAMPLE = 4

# three ImageNet synsets (tench, goldfish, great white shark) and what each class folder holds:
# (file name, Pillow mode, (width, height))
TOY_CLASSES = {
    "n01440764": [("a.JPEG", "RGB", (40, 30)), ("b.png", "L", (17, 23)), ("c.png", "RGBA", (64, 64))],
    "n01443537": [("a.png", "P", (50, 20)), ("b.JPEG", "RGB", (16, 16)), ("broken.JPEG", None, None)],
    "n01484850": [("a.png", "RGB", (90, 33)), ("b.png", "LA", (20, 41))],
}
TOY_NAMES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
TOY_READABLE = sum(1 for files in TOY_CLASSES.values() for _, mode, _ in files if mode is not None)
TOY_UNREADABLE = "n01443537/broken.JPEG"


def write_toy_dcae(folder: str | os.PathLike, seed: int = 0) -> str:
    """An ``AutoencoderDC`` of ``TOY_DCAE_CONFIG`` with seeded random weights, saved with
    ``save_pretrained`` into ``folder``; returns the folder."""
    import torch
    from diffusers import AutoencoderDC

    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
        torch.manual_seed(seed)
        vae = AutoencoderDC(**TOY_DCAE_CONFIG).eval()
    vae.save_pretrained(os.fspath(folder))
    return os.fspath(folder)


def draw_image(mode: str, size, seed: int):
    """A Pillow image of ``mode`` and ``size``: a seeded background with a rectangle and an ellipse."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    draw.rectangle([rng.randrange(w // 2), rng.randrange(h // 2), w - 1 - rng.randrange(w // 3), h - 1],
                   fill=tuple(rng.randrange(256) for _ in range(3)))
    draw.ellipse([0, 0, w // 2, h // 2], fill=tuple(rng.randrange(256) for _ in range(3)))
    if mode == "P":
        return img.quantize(colors=16)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.linear_gradient("L").resize(size))
        return img
    return img.convert(mode)


def write_toy_images(folder: str | os.PathLike) -> str:
    """The ImageNet-layout folder of ``TOY_CLASSES`` (one file of garbage bytes among them); returns it."""
    folder = os.fspath(folder)
    seed = 0
    for name, files in TOY_CLASSES.items():
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for fname, mode, size in files:
            path = os.path.join(folder, name, fname)
            seed += 1
            if mode is None:
                with open(path, "wb") as f:
                    f.write(b"\xff\xd8\xff\xe0 this is not a JPEG")
                continue
            img = draw_image(mode, size, seed)
            if fname.endswith(".JPEG"):
                img.save(path, format="JPEG", quality=90)
            else:
                img.save(path, format="PNG")
    return folder
