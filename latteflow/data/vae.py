"""Latent spaces (SPEC 3): a pixel "autoencoder" for small data and the DC-AE f32c32 through diffusers.

Both expose ``encode(images) -> latents`` and ``decode(latents) -> images`` on ``(B, C, H, W)``
tensors, plus ``latent_channels`` and ``downsample`` (latent side = image side / downsample).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latteflow.core.files import read_json

DC_AE_F32C32_SCALE = 0.3189  # scaling factor of dc-ae-f32c32-in-1.0


class PixelAutoencoder(nn.Module):
    """Identity with optional patchify: ``encode`` is ``(x - shift) * scale`` folded into
    ``patch_size x patch_size`` space-to-depth blocks (``(B, C, H, W) -> (B, C p^2, H/p, W/p)``),
    ``decode`` its exact inverse. For 8x8 digits with ``patch_size=1`` the latent is the image."""

    def __init__(self, in_channels: int = 1, patch_size: int = 1, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(scaling_factor, (int, float)) or scaling_factor == 0:
            raise ValueError(f"scaling_factor must be a non-zero number, got {scaling_factor!r}")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.patch_size**2

    @property
    def downsample(self) -> int:
        return self.patch_size

    def _check(self, name: str, x: Tensor, channels: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, H, W), got {getattr(x, 'shape', type(x).__name__)}")

    def encode(self, images: Tensor) -> Tensor:
        self._check("images", images, self.in_channels)
        p = self.patch_size
        if images.shape[2] % p or images.shape[3] % p:
            raise ValueError(f"images height and width must be multiples of patch_size={p}, got {tuple(images.shape[2:])}")
        z = (images - self.shift_factor) * self.scaling_factor
        return F.pixel_unshuffle(z, p) if p > 1 else z

    def decode(self, latents: Tensor) -> Tensor:
        self._check("latents", latents, self.latent_channels)
        z = F.pixel_shuffle(latents, self.patch_size) if self.patch_size > 1 else latents
        return z / self.scaling_factor + self.shift_factor


def _autoencoder_dc():
    try:
        from diffusers import AutoencoderDC
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("DCAutoencoder needs diffusers: pip install 'latteflow[dcae]'") from e
    return AutoencoderDC


def config_scaling_factor(path: str, vae: Optional[nn.Module] = None) -> float:
    """The ``scaling_factor`` a DC-AE's ``config.json`` records, or 0.3189 when it records none.

    diffusers fills a missing ``scaling_factor`` with its default 1.0 on load, so the file itself is read
    when ``path`` is a folder; otherwise (a hub-cache id) the loaded config's ``_use_default_values`` tells
    whether the value came from the file."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if os.path.isfile(config_file):
        raw = read_json(config_file)
        value = raw.get("scaling_factor") if isinstance(raw, dict) else None
    elif vae is not None and "scaling_factor" not in vae.config.get("_use_default_values", ["scaling_factor"]):
        value = vae.config.get("scaling_factor")
    else:
        value = None
    if value is None:
        return DC_AE_F32C32_SCALE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{config_file}: scaling_factor must be a positive number, got {value!r}")
    return float(value)


class DCAutoencoder(nn.Module):
    """diffusers ``AutoencoderDC`` with the latent scaling of LaTtE-Flow: ``encode(x) = E(x) * scale``,
    ``decode(z) = D(z / scale)``. Images in ``[-1, 1]``. ``scaling_factor`` defaults to 0.3189
    (``dc-ae-f32c32-in-1.0``); pass another for other DC-AE weights."""

    def __init__(self, vae: nn.Module, scaling_factor: float = DC_AE_F32C32_SCALE):
        super().__init__()
        if not isinstance(scaling_factor, (int, float)) or not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_pretrained(cls, path: str, *, scaling_factor: Optional[float] = None, local_files_only: bool = True,
                        **kwargs) -> "DCAutoencoder":
        """Loads weights from a local directory (or the local hub cache); never downloads unless
        ``local_files_only=False``. ``scaling_factor`` defaults to the one the folder's ``config.json``
        records, else 0.3189 (``dc-ae-f32c32-in-1.0``, whose original config lacks it)."""
        vae = _autoencoder_dc().from_pretrained(path, local_files_only=local_files_only, **kwargs)
        if scaling_factor is None:
            scaling_factor = config_scaling_factor(path, vae)
        return cls(vae.eval(), scaling_factor)

    @classmethod
    def from_config(cls, config: Dict[str, Any], *, scaling_factor: float = DC_AE_F32C32_SCALE) -> "DCAutoencoder":
        """A randomly initialised DC-AE of the given ``AutoencoderDC`` config (tests, benchmarks)."""
        return cls(_autoencoder_dc()(**config).eval(), scaling_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def _dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, images: Tensor) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {getattr(images, 'shape', type(images).__name__)}")
        d = self.downsample
        if images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"images height and width must be multiples of {d}, got {tuple(images.shape[2:])}")
        z = self.vae.encode(images.to(self._dtype())).latent
        return z * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        if not isinstance(latents, Tensor) or latents.dim() != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be (B, {self.latent_channels}, h, w), got {getattr(latents, 'shape', type(latents).__name__)}")
        return self.vae.decode((latents / self.scaling_factor).to(self._dtype())).sample
