"""``load_pipeline``: prompts in, uint8 images out (SPEC 3.1).

``load_pipeline("digits")`` loads the checkpoint shipped in ``latteflow/assets/digits``; any other
argument is a checkpoint directory (one holding ``config.json``, or a ``latteflow train`` output folder
holding ``model/``). A checkpoint that does not store its frozen backbone records the backbone's seed and
the SHA-256 of its weights: the backbone is rebuilt from the seed and the checksum must match.

    pipe = load_pipeline("digits")
    images = pipe(["digit 3", "digit 7"], steps=40, guidance=5.0, seed=0)   # uint8 (B, H, W, C)
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .checkpoint import CONFIG_NAME, load_checkpoint, read_config
from .images import to_uint8
from .model import LatteFlowModel
from .tokenizer import TOKENIZER_FILENAME, CharTokenizer
from .vae import PixelAutoencoder

__all__ = ["LatteFlowPipeline", "load_pipeline", "resolve_checkpoint", "SHIPPED"]

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
SHIPPED = {"digits": os.path.join(ASSETS, "digits")}


def resolve_checkpoint(name_or_path: Union[str, os.PathLike]) -> str:
    """The checkpoint directory for a shipped name or a path; FileNotFoundError when there is none."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a name ({sorted(SHIPPED)}) or a path, got {type(name_or_path).__name__}")
    key = os.fspath(name_or_path)
    path = SHIPPED.get(key, key)
    for candidate in (path, os.path.join(path, "model")):
        if os.path.isfile(os.path.join(candidate, CONFIG_NAME)):
            return candidate
    if key in SHIPPED:
        raise FileNotFoundError(f"the shipped checkpoint {key!r} is missing from {path!r} (broken install?)")
    raise FileNotFoundError(f"checkpoint {key!r}: no {CONFIG_NAME} in it (expected a checkpoint directory or a "
                            f"'latteflow train' output folder; shipped names: {sorted(SHIPPED)})")


def _rebuild_backbone(config: dict, path: str, device):
    from transformers import Qwen2VLConfig

    from .backbones import build_backbone
    from .digits import backbone_checksum

    meta = config.get("metadata") or {}
    seed, expected = meta.get("backbone_seed"), meta.get("backbone_sha256")
    if config.get("backbone") is None or seed is None or expected is None:
        raise ValueError(f"checkpoint {path!r} neither stores its backbone nor records its seed and checksum")
    backbone = build_backbone(Qwen2VLConfig.from_dict(config["backbone"]), seed=int(seed))
    got = backbone_checksum(backbone)
    if got != expected:
        raise ValueError(
            f"checkpoint {path!r}: the backbone rebuilt from seed {seed} has SHA-256 {got[:16]}..., the checkpoint "
            f"was trained on {expected[:16]}... (this torch/transformers draws different random weights; retrain "
            f"with 'latteflow train')")
    return backbone.to(device)


class LatteFlowPipeline:
    """A loaded model with its tokenizer and autoencoder. Call it with prompts."""

    def __init__(self, model: LatteFlowModel, tokenizer: CharTokenizer, autoencoder, path: Optional[str] = None,
                 info: Optional[dict] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.autoencoder = autoencoder
        self.path = path
        self.info = info or {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_prompts(self, prompts) -> list:
        """``prompts`` as a list of str; ValueError naming every character the tokenizer lacks."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(prompts).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
        known = set(self.tokenizer.alphabet)
        bad = sorted({c for p in prompts for c in p if c not in known})
        if bad:
            raise ValueError(f"prompts hold characters the tokenizer does not know: {', '.join(repr(c) for c in bad)} "
                             f"(known: {self.tokenizer.alphabet!r})")
        return prompts

    @torch.no_grad()
    def generate(self, prompts, *, steps: int = 40, guidance: float = 5.0, seed: int = 0) -> torch.Tensor:
        """float32 images ``(B, C, H, W)`` in [-1, 1] on the CPU (see ``__call__``)."""
        prompts = self.check_prompts(prompts)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not np.isfinite(guidance):
            raise TypeError(f"guidance must be a finite number, got {guidance!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        from .sampler import sample

        model, cfg = self.model, self.model.cfg
        ids, mask = self.tokenizer.encode(prompts, device=self.device)
        ctx = model.build_context(ids, mask)
        null_ids, null_mask = self.tokenizer.encode([""], device=self.device)
        null_ctx = model.build_context(null_ids, null_mask)
        g = torch.Generator().manual_seed(seed)  # CPU noise: the same images on every device
        noise = torch.randn((len(prompts), cfg.latent_channels, *cfg.latent_hw), generator=g)
        latents = sample(model, ctx, null_ctx, steps=steps, guidance=float(guidance), noise=noise.to(self.device))
        return self.autoencoder.decode(latents.float()).clamp(-1.0, 1.0).cpu()

    def __call__(self, prompts, steps: int = 40, guidance: float = 5.0, seed: int = 0) -> np.ndarray:
        """uint8 numpy ``(B, H, W, C)``: one image per prompt, Euler with ``steps`` steps and classifier-free
        guidance ``guidance``; the initial noise comes from ``seed`` (same seed, same images)."""
        return to_uint8(self.generate(prompts, steps=steps, guidance=guidance, seed=seed))

    def __repr__(self) -> str:
        c = self.model.cfg
        return (f"LatteFlowPipeline({self.path!r}, variant={c.variant!r}, groups={c.num_groups}, "
                f"device={self.device})")


def load_pipeline(checkpoint: Union[str, os.PathLike] = "digits", *, device=None,
                  backend: Optional[str] = None) -> LatteFlowPipeline:
    """The pipeline of a shipped checkpoint name (``"digits"``) or a checkpoint directory. ``device``:
    default CUDA when available, else CPU. ``backend``: override ``"fused"`` / ``"reference"``."""
    path = resolve_checkpoint(checkpoint)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must name a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available here")
    config = read_config(path)
    tok_file = os.path.join(path, TOKENIZER_FILENAME)
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"checkpoint {path!r} has no {TOKENIZER_FILENAME}")
    tokenizer = CharTokenizer.load(tok_file)
    overrides = {} if backend is None else {"backend": backend}
    if config.get("includes_backbone"):
        model = load_checkpoint(path, device=device, **overrides)
    else:
        model = load_checkpoint(path, _rebuild_backbone(config, path, device), **overrides)
    model = model.to(device)
    ae = (config.get("metadata") or {}).get("autoencoder", {"type": "pixel", "in_channels": 1, "patch_size": 1})
    if ae.get("type") != "pixel":
        raise ValueError(f"checkpoint {path!r}: autoencoder {ae.get('type')!r} is not supported by load_pipeline")
    autoencoder = PixelAutoencoder(int(ae.get("in_channels", 1)), int(ae.get("patch_size", 1)))
    if autoencoder.latent_channels != model.cfg.latent_channels:
        raise ValueError(f"checkpoint {path!r}: autoencoder latent channels {autoencoder.latent_channels} != "
                         f"model latent_channels {model.cfg.latent_channels}")
    return LatteFlowPipeline(model, tokenizer, autoencoder, path=path, info=config.get("metadata") or {})
