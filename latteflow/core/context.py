"""The cached prompt context: each backbone layer's K/V over the prompt, built once (SPEC 3).

``Context`` holds, per decoder layer, the keys (M-RoPE already applied, exactly as the VLM's KV cache
holds them) and values in BSHD ``(B, Nc, Hkv, D)``, and ``ctx_lens`` int32 ``(B,)``: each row's
valid tokens sit at the front, keys at index ``>= ctx_lens[b]`` are padding (the contract of
``lk.context_attention``). Helpers batch contexts of different lengths together (conditional and
null-prompt rows for classifier-free guidance) without ever mixing their keys.

``build_context`` runs the backbone once over the prompt; ``LatteFlowModel.build_context`` calls it.
``PromptContexts`` builds and pads the contexts of a whole prompt list, chunk by chunk, for samplers
and trainers that index prompts by number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import latte_kernels as lk


@dataclass(frozen=True)
class Context:
    """Per-layer context K/V, ``keys[l]`` and ``values[l]`` of shape ``(B, Nc, Hkv, D)``, and
    ``ctx_lens`` int32 ``(B,)`` (valid keys are ``[0, ctx_lens[b])``)."""

    keys: Tuple[Tensor, ...]
    values: Tuple[Tensor, ...]
    ctx_lens: Tensor

    def __post_init__(self):
        if len(self.keys) == 0 or len(self.keys) != len(self.values):
            raise ValueError(f"keys and values must be non-empty and of equal length, got {len(self.keys)} and {len(self.values)}")
        k0 = self.keys[0]
        for name, seq in (("keys", self.keys), ("values", self.values)):
            for t in seq:
                if t.dim() != 4 or t.shape[:2] != k0.shape[:2]:
                    raise ValueError(f"{name} must all be (B, Nc, Hkv, D) with B, Nc = {tuple(k0.shape[:2])}, got {tuple(t.shape)}")
        if self.ctx_lens.shape != (k0.shape[0],) or self.ctx_lens.dtype != torch.int32:
            raise ValueError(f"ctx_lens must be int32 of shape ({k0.shape[0]},), got {self.ctx_lens.dtype} {tuple(self.ctx_lens.shape)}")

    def check_lens(self) -> "Context":
        """Checks ``0 <= ctx_lens <= Nc`` (one host read, skipped inside CUDA-graph capture and
        torch.compile). The model does this once per call, so its generation layers run the attention
        op without per-layer checks, each of which would be a host sync on CUDA."""
        lk.check_ctx_lens(self.ctx_lens, self.max_len)
        return self

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        """``Nc``, the padded length."""
        return self.keys[0].shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def _map(self, fn, lens_fn=None) -> "Context":
        lens = self.ctx_lens if lens_fn is None else lens_fn(self.ctx_lens)
        return Context(tuple(fn(k) for k in self.keys), tuple(fn(v) for v in self.values), lens)

    def to(self, device=None, dtype=None) -> "Context":
        """Moves (and optionally casts the K/V of) the context; ``ctx_lens`` stays int32."""
        return self._map(lambda t: t.to(device=device, dtype=dtype), lambda n: n.to(device=device))

    def detach(self) -> "Context":
        return self._map(Tensor.detach)

    def pad_to(self, length: int) -> "Context":
        """Zero-pads the key axis to ``length`` (>= ``max_len``); valid keys are untouched."""
        if length < self.max_len:
            raise ValueError(f"length must be >= max_len={self.max_len}, got {length}")
        if length == self.max_len:
            return self
        extra = length - self.max_len
        return self._map(lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, extra)))

    def repeat(self, repeats: int) -> "Context":
        """Each row repeated ``repeats`` times consecutively (``repeat_interleave``, like
        ``num_images_per_prompt``): rows ``b*repeats .. b*repeats + repeats - 1`` are row ``b``."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        if repeats == 1:
            return self
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0), lambda n: n.repeat_interleave(repeats))

    def expand_to(self, batch_size: int) -> "Context":
        """A context of ``batch_size`` rows: itself if it has that many, its single row repeated if it
        has one; anything else raises (used to broadcast one null prompt over a batch)."""
        if self.batch_size == batch_size:
            return self
        if self.batch_size == 1:
            return self.repeat(batch_size)
        raise ValueError(f"context has {self.batch_size} rows, cannot serve a batch of {batch_size} (need {batch_size} or 1)")

    def index_select(self, index: Tensor) -> "Context":
        """Rows ``index`` (a long tensor) in that order."""
        index = index.to(self.device)
        return self._map(lambda t: t.index_select(0, index), lambda n: n.index_select(0, index))

    def where(self, mask: Tensor, other: "Context") -> "Context":
        """Row ``b`` from ``other`` where ``mask[b]``, else from ``self`` (both padded to the longer
        ``Nc``). Used by classifier-free-guidance dropout during training."""
        other = other.expand_to(self.batch_size)
        if other.num_layers != self.num_layers:
            raise ValueError(f"other has {other.num_layers} layers, this context {self.num_layers}")
        n = max(self.max_len, other.max_len)
        a, b = self.pad_to(n), other.pad_to(n)
        mask = mask.to(self.device, torch.bool)
        m4 = mask[:, None, None, None]
        keys = tuple(torch.where(m4, kb, ka) for ka, kb in zip(a.keys, b.keys))
        values = tuple(torch.where(m4, vb, va) for va, vb in zip(a.values, b.values))
        return Context(keys, values, torch.where(mask, b.ctx_lens, a.ctx_lens))

    @staticmethod
    def cat(contexts: Sequence["Context"]) -> "Context":
        """Concatenates contexts along the batch, padding every one to the longest ``Nc`` (e.g.
        conditional and null-prompt rows in one batch; their ``ctx_lens`` differ)."""
        contexts = list(contexts)
        if not contexts:
            raise ValueError("contexts must hold at least one Context")
        n_layers = {c.num_layers for c in contexts}
        if len(n_layers) != 1:
            raise ValueError(f"contexts must have the same number of layers, got {sorted(n_layers)}")
        n = max(c.max_len for c in contexts)
        padded = [c.pad_to(n) for c in contexts]
        keys = tuple(torch.cat([c.keys[i] for c in padded]) for i in range(padded[0].num_layers))
        values = tuple(torch.cat([c.values[i] for c in padded]) for i in range(padded[0].num_layers))
        return Context(keys, values, torch.cat([c.ctx_lens for c in padded]))


# --------------------------------------------------------------------------------------------------
# building the cache


def text_model(backbone):
    """The decoder stack (has ``.layers``) of a Qwen2-VL model, across transformers layouts:
    ``model.model.language_model`` (transformers >= 4.52) or ``model.model`` (older)."""
    inner = getattr(backbone, "model", backbone)
    lm = getattr(inner, "language_model", None)
    if lm is not None and hasattr(lm, "layers"):
        return lm
    if hasattr(inner, "layers"):
        return inner
    raise TypeError(f"backbone must be a Qwen2VLForConditionalGeneration, got {type(backbone).__name__}")


def _vlm(backbone):
    """The module whose forward takes input_ids + pixel_values and returns the KV cache without
    the LM head: ``Qwen2VLModel`` in both layouts."""
    return getattr(backbone, "model", backbone)


def output_cache(out):
    """The KV cache of a transformers model output, without the deprecation warning: the field is
    ``cache`` as of transformers 5.2x and ``past_key_values`` before (5.17, the GPU machine's)."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _cache_kv(cache, layer: int) -> Tuple[Tensor, Tensor]:
    """(keys, values) of one layer of a transformers cache, (B, Hkv, N, D), across cache layouts."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer].keys, layers[layer].values
    if hasattr(cache, "key_cache"):
        return cache.key_cache[layer], cache.value_cache[layer]
    k, v = cache[layer]  # legacy tuple of tuples
    return k, v


def _left_pack(t: Tensor, order: Tensor) -> Tensor:
    return torch.gather(t, 1, order)


def _rope_positions(backbone, input_ids, attention_mask, image_grid_thw) -> Tensor:
    """(3, B, N) M-RoPE positions of right-padded rows, as the model computes them."""
    b, n = input_ids.shape
    if image_grid_thw is None:
        pos = torch.arange(n, device=input_ids.device).expand(b, n)
        return pos.unsqueeze(0).expand(3, b, n)
    owner = _vlm(backbone) if hasattr(_vlm(backbone), "get_rope_index") else backbone
    config = backbone.config
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == config.image_token_id] = 1
    try:  # transformers >= 5.x takes the modality of every token
        pos, _ = owner.get_rope_index(
            input_ids, mm_token_type_ids=mm, image_grid_thw=image_grid_thw, attention_mask=attention_mask
        )
    except TypeError:
        pos, _ = owner.get_rope_index(input_ids, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return pos


def build_context(
    backbone,
    input_ids: Tensor,
    attention_mask: Optional[Tensor] = None,
    pixel_values: Optional[Tensor] = None,
    image_grid_thw: Optional[Tensor] = None,
) -> Context:
    """One forward of the VLM over the prompt, keeping every layer's K/V cache.

    Padding (left, right, or mixed) is removed first: each row's valid tokens are moved to the front
    (stable order), so a causal forward never lets a valid token see padding and keys at index
    ``>= ctx_lens[b]`` are padding. Left- and right-padded prompts therefore give the same context.
    Gradients flow if they are enabled (the blend variant trains the backbone); the caller decides.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor (B, N), got {getattr(input_ids, 'shape', input_ids)!r}")
    input_ids = input_ids.long()
    b, n = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {getattr(attention_mask, 'shape', attention_mask)!r}")
    valid = attention_mask.to(input_ids.device).bool()
    lens = valid.sum(dim=1)
    if n == 0 or bool((lens == 0).any()):
        raise ValueError("every row of input_ids needs at least one unmasked token (attention_mask)")
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    # stable sort puts valid tokens first, in their order; padding after
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    nc = int(lens.max())
    order = order[:, :nc]
    ids = _left_pack(input_ids, order)
    mask = (torch.arange(nc, device=ids.device)[None] < lens[:, None]).long()
    pad_id = getattr(backbone.config, "pad_token_id", None)
    ids = ids.masked_fill(mask == 0, 0 if pad_id is None else int(pad_id))
    position_ids = _rope_positions(backbone, ids, mask, image_grid_thw)
    kwargs = {}
    if pixel_values is not None:
        kwargs.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
    out = _vlm(backbone)(
        input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, return_dict=True, **kwargs
    )
    cache = output_cache(out)
    keys: List[Tensor] = []
    values: List[Tensor] = []
    for layer in range(len(text_model(backbone).layers)):
        k, v = _cache_kv(cache, layer)
        keys.append(k.transpose(1, 2).contiguous())  # BSHD, contiguous once rather than per step
        values.append(v.transpose(1, 2).contiguous())
    return Context(tuple(keys), tuple(values), lens.to(torch.int32))


class PromptContexts:
    """Contexts of a prompt list, built lazily in fixed chunks of the list (so a prompt's context does
    not depend on which rank or batch asks for it) and padded to one common length, plus the null
    prompt's. ``tokenizer.encode(texts, device=)`` returns ``(input_ids, attention_mask)``."""

    def __init__(self, model, tokenizer, prompts: Sequence[str], chunk: int = 256):
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        self.model, self.tokenizer, self.prompts, self.chunk = model, tokenizer, list(prompts), chunk
        lengths = [int(tokenizer.encode(self.prompts[i:i + chunk])[1].sum(1).max())
                   for i in range(0, len(self.prompts), chunk)]
        self.null = self._build([""])
        self.length = max(max(lengths), self.null.max_len)
        self.null = self.null.pad_to(self.length)
        self._chunks: Dict[int, Context] = {}

    def _build(self, texts: List[str]) -> Context:
        ids, mask = self.tokenizer.encode(texts, device=self.model.device)
        with torch.no_grad():
            return self.model.build_context(ids, mask)

    def rows(self, prompt_index: Sequence[int]) -> Context:
        """The contexts of prompts ``prompt_index`` (one row each, in order)."""
        parts = []
        for p in prompt_index:
            c, j = divmod(int(p), self.chunk)
            if c not in self._chunks:
                self._chunks[c] = self._build(self.prompts[c * self.chunk:(c + 1) * self.chunk]).pad_to(self.length)
            parts.append(self._chunks[c].index_select(torch.tensor([j])))
        return Context.cat(parts)
