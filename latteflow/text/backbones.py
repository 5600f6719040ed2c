"""Qwen2-VL backbone configs and seeded random-weight backbones (no download).

``tiny_qwen2vl_config`` is the small Qwen2-VL-architecture backbone of the shipped digits model
(vocabulary = the package's character tokenizer); ``paper_qwen2vl_config`` has the text shapes of
Qwen2-VL-2B for benchmarks. ``build_backbone`` makes a ``Qwen2VLForConditionalGeneration`` whose
random weights depend only on the seed; ``backbone_checksum`` is the SHA-256 of its weights that a
checkpoint records when it does not store its frozen backbone.

transformers changed how rope settings are spelled: 5.x reads
``text_config.rope_parameters = {"rope_type": "default", "rope_theta": ..., "mrope_section": [...]}``,
4.x reads top-level ``rope_theta`` and ``rope_scaling = {"type": "mrope", "mrope_section": [...]}``.
The builders write the spelling of the installed version; ``rope_settings`` reads either.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
import transformers
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from latteflow.text.tokenizer import CharTokenizer

__all__ = [
    "QWEN2VL_2B_VISION", "TINY_VISION", "backbone_checksum", "build_backbone", "paper_qwen2vl_config", "rope_settings",
    "text_config", "text_position_ids", "tiny_qwen2vl_config",
]

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# Text shapes, in the Qwen2 config's own names (head_dim is hidden_size // num_attention_heads there).
_TINY_TEXT = dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[4, 6, 6],
                  max_position_embeddings=512, tie_word_embeddings=True)
_PAPER_TEXT = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                   intermediate_size=8960, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[16, 24, 24],
                   max_position_embeddings=32768, tie_word_embeddings=True, vocab_size=151936,
                   bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                   vision_start_token_id=151652, vision_end_token_id=151653,
                   image_token_id=151655, video_token_id=151656)
# A vision tower that builds in milliseconds; latteflow never feeds it images for the digits model.
# (``hidden_size`` of a vision config is the merger's output width, set to the text hidden size.)
TINY_VISION = dict(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2, in_channels=3, patch_size=2,
                   spatial_merge_size=2, temporal_patch_size=2)
# Qwen2-VL-2B's real vision tower, for callers that want it: ``paper_qwen2vl_config(vision_config=QWEN2VL_2B_VISION)``.
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, in_channels=3, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2)

_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "vision_start_token_id", "vision_end_token_id",
               "image_token_id", "video_token_id")
_ALLOWED = set(_TINY_TEXT) | set(_TOKEN_KEYS) | {"vocab_size", "vision_config", "initializer_range"}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _make_config(base: dict[str, Any], overrides: dict[str, Any]) -> Qwen2VLConfig:
    unknown = sorted(set(overrides) - _ALLOWED)
    if unknown:
        raise TypeError(f"unknown config override(s) {unknown}; allowed: {sorted(_ALLOWED)}")
    p = {**base, **overrides}
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "max_position_embeddings", "vocab_size"):
        _positive_int(k, p[k])
    if p["hidden_size"] % p["num_attention_heads"]:
        raise ValueError(f"hidden_size ({p['hidden_size']}) must be a multiple of num_attention_heads "
                         f"({p['num_attention_heads']})")
    if p["num_attention_heads"] % p["num_key_value_heads"]:
        raise ValueError(f"num_attention_heads ({p['num_attention_heads']}) must be a multiple of "
                         f"num_key_value_heads ({p['num_key_value_heads']})")
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    section = p["mrope_section"]
    if (not isinstance(section, (list, tuple)) or len(section) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in section)):
        raise ValueError(f"mrope_section must be three positive ints, got {section!r}")
    if sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section {list(section)} must sum to head_dim/2 = {head_dim // 2} "
                         f"(head_dim = hidden_size / num_attention_heads = {head_dim})")
    theta = p["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    for k in _TOKEN_KEYS:
        if not isinstance(p[k], int) or not 0 <= p[k] < p["vocab_size"]:
            raise ValueError(f"{k} ({p[k]!r}) must be an id in [0, vocab_size={p['vocab_size']})")
    vision = dict(TINY_VISION if p.get("vision_config") is None else p["vision_config"])
    vision["hidden_size"] = p["hidden_size"]  # the merger projects vision features to the text width

    text = {k: p[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                              "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                              "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")}
    if "initializer_range" in p:
        text["initializer_range"] = p["initializer_range"]
    top = {k: p[k] for k in ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")}
    if _TRANSFORMERS_MAJOR >= 5:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta),
                                   "mrope_section": list(section)}
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=p["tie_word_embeddings"],
                             **top)
    # transformers 4.x: flat text fields and the legacy rope spelling.
    return Qwen2VLConfig(**text, rope_theta=float(theta), rope_scaling={"type": "mrope", "mrope_section": list(section)},
                         vision_config=vision, tie_word_embeddings=p["tie_word_embeddings"], **top)


def tiny_qwen2vl_config(tokenizer: CharTokenizer | None = None, **overrides) -> Qwen2VLConfig:
    """The digits backbone: Qwen2-VL architecture, hidden 128, 8 layers, 4 heads (2 KV), head_dim 32,
    MLP 256, RMSNorm eps 1e-6, rope theta 1e6, mrope_section [4, 6, 6], a tiny vision tower.

    Vocabulary and special ids come from ``tokenizer`` (default: ``CharTokenizer()``). ``overrides``
    replace any of: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, rms_norm_eps, rope_theta, mrope_section, max_position_embeddings,
    tie_word_embeddings, vocab_size, the token ids, initializer_range, vision_config (a dict).
    """
    tok = CharTokenizer() if tokenizer is None else tokenizer
    if not isinstance(tok, CharTokenizer):
        raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tok).__name__}")
    base = dict(_TINY_TEXT, vocab_size=tok.vocab_size, **{k: getattr(tok, k) for k in _TOKEN_KEYS})
    return _make_config(base, overrides)


def paper_qwen2vl_config(**overrides) -> Qwen2VLConfig:
    """Qwen2-VL-2B text shapes (hidden 1536, 28 layers, 12 heads, 2 KV heads, head_dim 128, MLP 8960,
    eps 1e-6, theta 1e6, mrope_section [16, 24, 24], vocab 151936) with the tiny vision tower by default
    (pass ``vision_config=QWEN2VL_2B_VISION`` for the real one). Same overrides as ``tiny_qwen2vl_config``."""
    return _make_config(dict(_PAPER_TEXT), overrides)


def text_config(config: Qwen2VLConfig):
    """The text part of a Qwen2-VL config (``config.text_config`` on 5.x, the config itself on old 4.x)."""
    return config.get_text_config()


def rope_settings(config) -> tuple[float, tuple[int, int, int]]:
    """``(rope_theta, mrope_section)`` of a Qwen2-VL config, whichever transformers spelling it uses."""
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(tc, "rope_parameters", None) or getattr(tc, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
    section = params.get("mrope_section")
    if theta is None or section is None:
        raise ValueError(f"config holds no M-RoPE settings (rope params {params!r})")
    return float(theta), tuple(int(s) for s in section)


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """M-RoPE position ids ``(3, B, L)`` for text-only prompts: each row counts its valid tokens from 0,
    padded slots get 0. With right padding this equals the backbone's default; with left padding pass
    it as ``position_ids`` so a prompt's positions do not depend on its batch."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError("attention_mask must be a 2-D tensor (B, L)")
    mask = attention_mask.long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()


def build_backbone(config: Qwen2VLConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> Qwen2VLForConditionalGeneration:
    """A ``Qwen2VLForConditionalGeneration`` with random weights drawn on CPU from ``seed`` (so the same
    seed gives the same weights on every machine), cast to ``dtype``, moved to ``device``, in eval
    mode. The global RNG state is left as it was."""
    if not isinstance(config, Qwen2VLConfig):
        raise TypeError(f"config must be a transformers Qwen2VLConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def backbone_checksum(backbone: torch.nn.Module) -> str:
    """SHA-256 over the backbone's tensors (names, shapes, float32 bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(backbone.state_dict().items()):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
