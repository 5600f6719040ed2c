"""``load_pipeline``: prompts in, uint8 images out (SPEC 3.1).

``load_pipeline("digits")`` loads the checkpoint shipped in ``latteflow/assets/digits``; any other
argument is a checkpoint directory (one holding ``config.json``, or a ``latteflow train`` output folder
holding ``model/``). A checkpoint that does not store its frozen backbone records the backbone's seed and
the SHA-256 of its weights: the backbone is rebuilt from the seed and the checksum must match. Every file
the checkpoint records is checked against its SHA-256 as it is read (``latteflow.core.checkpoint``).

A class-conditional checkpoint records its prompt set (``extra["prompts"]`` of its config; the digits
model's ten ``"digit 0"`` .. ``"digit 9"``): ``pipe.prompts`` lists it and a prompt outside it is refused
with a ValueError naming some of the known ones (the model was never taught anything else).

    pipe = load_pipeline("digits")
    images = pipe(["digit 3", "digit 7"], steps=40, guidance=5.0, seed=0)   # uint8 (B, H, W, C)
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from latteflow.core.checkpoint import (CONFIG_NAME, FILES_KEY, WEIGHTS_NAME, build_recorded_backbone, incomplete_reason,
                         load_checkpoint, read_config, verify_checkpoint_file)
from latteflow.data.images import to_uint8
from latteflow.core.model import LatteFlowModel
from latteflow.text.tokenizer import TOKENIZER_FILENAME, CharTokenizer
from latteflow.data.vae import PixelAutoencoder

__all__ = ["LatteFlowPipeline", "load_pipeline", "resolve_checkpoint", "SHIPPED", "sample_prompts"]

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
    from latteflow.text.backbones import build_backbone
    from latteflow.text.backbones import backbone_checksum

    meta = config.get("metadata") or {}
    seed, expected = meta.get("backbone_seed"), meta.get("backbone_sha256")
    if config.get("backbone") is None or seed is None or expected is None:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: the checkpoint neither stores its backbone nor records "
                         f"the seed and SHA-256 to rebuild it (backbone, metadata.backbone_seed / backbone_sha256)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: metadata.backbone_seed must be a non-negative int, "
                         f"got {seed!r}")
    backbone = build_recorded_backbone(path, config, lambda cfg: build_backbone(cfg, seed=seed))
    got = backbone_checksum(backbone)
    if got != expected:
        raise ValueError(
            f"{os.path.join(path, CONFIG_NAME)}: the backbone rebuilt from seed {seed} has SHA-256 {got[:16]}..., the "
            f"checkpoint was trained on {expected[:16]}... (this torch/transformers draws different random weights; "
            f"retrain with 'latteflow train')")
    return backbone.to(device)


def _recorded_folder(config: dict, path: str, key: str) -> dict:
    """``metadata[key]`` = ``{"folder", "sha256"}`` of a checkpoint trained on pretrained weights."""
    rec = (config.get("metadata") or {}).get(key)
    if (not isinstance(rec, dict) or not isinstance(rec.get("folder"), str)
            or not isinstance(rec.get("sha256"), str)):
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: metadata.{key} must be {{'folder', 'sha256'}}, "
                         f"got {rec!r}")
    return rec


def _dc_autoencoder(config: dict, path: str, ae: dict, vae_dir=None):
    """The DC-AE a prepared-data checkpoint records: from ``vae_dir`` or the recorded folder, its weights
    checked against the SHA-256 the prepare manifest recorded."""
    from latteflow.data.vae import DCAutoencoder
    from latteflow.text.pretrained import check_backbone_folder

    rec = _recorded_folder(config, path, "vae")
    folder = check_backbone_folder(rec["folder"] if vae_dir is None else vae_dir, rec["sha256"], what="VAE")
    scale = ae.get("scaling_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: metadata.autoencoder.scaling_factor must be a "
                         f"positive number, got {scale!r}")
    try:
        autoencoder = DCAutoencoder.from_pretrained(folder, scaling_factor=float(scale))
    except (OSError, ValueError) as e:
        raise ValueError(f"VAE folder {folder!r}: not a DC-AE from_pretrained can read ({_first(e)})") from None
    if autoencoder.latent_channels != config["latteflow"].get("latent_channels"):
        raise ValueError(f"VAE folder {folder!r}: {autoencoder.latent_channels} latent channels, the checkpoint's "
                         f"model {config['latteflow'].get('latent_channels')!r}")
    return autoencoder


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _autoencoder(config: dict, path: str, vae_dir=None):
    """The latent space a checkpoint records (``metadata.autoencoder``; the pixel one by default)."""
    ae = config["metadata"].get("autoencoder", {"type": "pixel", "in_channels": 1, "patch_size": 1})
    where = f"{os.path.join(path, CONFIG_NAME)}: metadata.autoencoder"
    if not isinstance(ae, dict):
        raise ValueError(f"{where} must be an object, got {ae!r}")
    if ae.get("type") == "dc-ae":
        return _dc_autoencoder(config, path, ae, vae_dir)
    if vae_dir is not None:
        raise ValueError(f"vae: checkpoint {path!r} decodes with the pixel autoencoder, it takes no VAE folder")
    if ae.get("type") != "pixel":
        raise ValueError(f"{where}: type {ae.get('type')!r} is not supported by load_pipeline ('pixel', 'dc-ae')")
    sizes = {k: ae.get(k, 1) for k in ("in_channels", "patch_size")}
    for k, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {k} must be a positive int, got {v!r}")
    autoencoder = PixelAutoencoder(sizes["in_channels"], sizes["patch_size"])
    latent = config["latteflow"].get("latent_channels")
    if autoencoder.latent_channels != latent:
        raise ValueError(f"{where}: {autoencoder.latent_channels} latent channels, the model's latent_channels is "
                         f"{latent!r}")
    return autoencoder


def _prompt_set(config: dict, path: str) -> Optional[List[str]]:
    """The recorded prompt set of a checkpoint config, or None when it records none."""
    prompts = (config["latteflow"].get("extra") or {}).get("prompts")
    if prompts is None:
        return None
    if (not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: extra.prompts must be a non-empty list of strings, "
                         f"got {prompts!r}")
    return list(prompts)


def _some(prompts: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(p) for p in prompts[:limit if len(prompts) <= limit else limit // 2])
    return shown if len(prompts) <= limit else f"{shown}, ... ({len(prompts)} in all)"


def sample_prompts(prompts: Sequence[str], limit: int = 10) -> List[str]:
    """Up to ``limit`` of ``prompts``, evenly spread over the list (all of them when it is short)."""
    n = len(prompts)
    k = min(limit, n)
    return [prompts[i * n // k] for i in range(k)]


class LatteFlowPipeline:
    """A loaded model with its tokenizer and autoencoder. Call it with prompts."""

    def __init__(self, model: LatteFlowModel, tokenizer: CharTokenizer, autoencoder, path: Optional[str] = None,
                 info: Optional[dict] = None, prompts: Optional[Sequence[str]] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.autoencoder = autoencoder
        self.path = path
        self.info = info or {}
        self.prompts = None if prompts is None else list(prompts)  # the class-conditional prompt set, if any

    @property
    def device(self) -> torch.device:
        return self.model.device

    def check_prompts(self, prompts) -> list:
        """``prompts`` as a list of str; ValueError naming every character the tokenizer lacks, or the
        prompts outside the checkpoint's prompt set."""
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
        alphabet = getattr(self.tokenizer, "alphabet", None)  # the char tokenizer's; a BPE one takes any text
        bad = [] if alphabet is None else sorted({c for p in prompts for c in p if c not in set(alphabet)})
        outside = [] if self.prompts is None else list(dict.fromkeys(p for p in prompts if p not in set(self.prompts)))
        if bad:
            known_prompts = f"; this class-conditional checkpoint knows only {_some(self.prompts)}" if outside else ""
            raise ValueError(f"prompts hold characters the tokenizer does not know: {', '.join(repr(c) for c in bad)} "
                             f"(known: {self.tokenizer.alphabet!r}){known_prompts}")
        if outside:
            which = f"prompt {outside[0]!r} is" if len(outside) == 1 else f"prompts {_some(outside, 4)} are"
            raise ValueError(f"{which} not among the {len(self.prompts)} prompts this class-conditional "
                             f"checkpoint knows: {_some(self.prompts)}")
        return prompts

    @torch.no_grad()
    def generate(self, prompts, *, steps: int = 40, guidance: float = 5.0, seed: int = 0, progress: bool = False,
                 batch_size: int = 256) -> torch.Tensor:
        """float32 images ``(B, C, H, W)`` in [-1, 1] on the CPU (see ``__call__``), sampled
        ``batch_size`` prompts at a time (each row gets the same noise whatever the chunks), with one
        tqdm bar over all steps when ``progress`` (and stderr is a terminal)."""
        prompts = self.check_prompts(prompts)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not np.isfinite(guidance):
            raise TypeError(f"guidance must be a finite number, got {guidance!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        from latteflow.core.sampler import progress_bar, sample

        model, cfg = self.model, self.model.cfg
        null_ids, null_mask = self.tokenizer.encode([""], device=self.device)
        null_ctx = model.build_context(null_ids, null_mask)
        g = torch.Generator().manual_seed(seed)  # CPU noise: the same images on every device
        noise = torch.randn((len(prompts), cfg.latent_channels, *cfg.latent_hw), generator=g)
        chunks = range(0, len(prompts), batch_size)
        images = []
        with progress_bar(len(chunks) * steps, "sampling", progress) as bar:
            for i in chunks:
                ids, mask = self.tokenizer.encode(prompts[i:i + batch_size], device=self.device)
                ctx = model.build_context(ids, mask)
                latents = sample(model, ctx, null_ctx, steps=steps, guidance=float(guidance),
                                 noise=noise[i:i + batch_size].to(self.device), progress=bar)
                images.append(self.autoencoder.decode(latents.float()).float().clamp(-1.0, 1.0).cpu())
        return torch.cat(images)

    def __call__(self, prompts, steps: int = 40, guidance: float = 5.0, seed: int = 0, *,
                 progress: bool = False) -> np.ndarray:
        """uint8 numpy ``(B, H, W, C)``: one image per prompt, Euler with ``steps`` steps and classifier-free
        guidance ``guidance``; the initial noise comes from ``seed`` (same seed, same images).
        ``progress``: a tqdm bar of the sampling steps."""
        return to_uint8(self.generate(prompts, steps=steps, guidance=guidance, seed=seed, progress=progress))

    def __repr__(self) -> str:
        c = self.model.cfg
        return (f"LatteFlowPipeline({self.path!r}, variant={c.variant!r}, groups={c.num_groups}, "
                f"device={self.device})")


def _pretrained_parts(config: dict, path: str, device, backbone_dir=None):
    """``(backbone, tokenizer)`` of a checkpoint trained on a pretrained Qwen2-VL: from ``backbone_dir``
    or the recorded folder, whose weights must have the recorded SHA-256."""
    from latteflow.text.pretrained import load_pretrained_backbone
    from latteflow.text.prompts import ChatPromptTokenizer

    rec = _recorded_folder(config, path, "backbone")
    folder = rec["folder"] if backbone_dir is None else os.fspath(backbone_dir)
    backbone = load_pretrained_backbone(folder, sha256=rec["sha256"], device=device)
    return backbone, ChatPromptTokenizer.from_pretrained(folder)


def load_pipeline(checkpoint: Union[str, os.PathLike] = "digits", *, device=None,
                  backend: Optional[str] = None, backbone=None, vae=None) -> LatteFlowPipeline:
    """The pipeline of a shipped checkpoint name (``"digits"``) or a checkpoint directory. ``device``:
    default CUDA when available, else CPU. ``backend``: override ``"fused"`` / ``"reference"``.
    ``backbone`` / ``vae``: folders replacing the ones a checkpoint trained on pretrained weights
    records (their weights must still have the recorded SHA-256)."""
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
    if WEIGHTS_NAME in config.get(FILES_KEY, {}):  # every recorded file present at its size (hashed as read)
        problem = incomplete_reason(path)
        if problem is not None:
            raise ValueError(problem)
    autoencoder = _autoencoder(config, path, vae)
    prompts = _prompt_set(config, path)
    overrides = {} if backend is None else {"backend": backend}
    if (config.get("metadata") or {}).get("tokenizer", {}).get("type") == "pretrained":
        bb, tokenizer = _pretrained_parts(config, path, device, backbone)
        model = load_checkpoint(path, bb, **overrides)  # blend: its trained backbone weights load over bb's
        return LatteFlowPipeline(model.to(device), tokenizer, autoencoder.to(device), path=path,
                                 info=config.get("metadata") or {}, prompts=prompts)
    if backbone is not None:
        raise ValueError(f"backbone: checkpoint {path!r} was not trained on a pretrained backbone folder")
    tok_file = os.path.join(path, TOKENIZER_FILENAME)
    if not os.path.isfile(tok_file):
        raise FileNotFoundError(f"checkpoint {path!r} has no {TOKENIZER_FILENAME}")
    if TOKENIZER_FILENAME in config.get(FILES_KEY, {}):
        verify_checkpoint_file(path, TOKENIZER_FILENAME, config)
    try:
        tokenizer = CharTokenizer.load(tok_file)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"{tok_file}: not a tokenizer file ({e})") from None
    if config.get("includes_backbone"):
        model = load_checkpoint(path, device=device, **overrides)
    else:
        model = load_checkpoint(path, _rebuild_backbone(config, path, device), **overrides)
    model = model.to(device)
    return LatteFlowPipeline(model, tokenizer, autoencoder, path=path, info=config.get("metadata") or {},
                             prompts=prompts)
