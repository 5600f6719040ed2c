"""Routes a transformers Qwen2-VL model's text rotary embedding through ``lk.mrope``.

In transformers 5.x, ``Qwen2VLTextModel`` calls ``self.rotary_emb(hidden, position_ids)`` once per
forward to build recomposed cos/sin tables ``(B, N, D)``, and every ``Qwen2VLAttention.forward`` calls
the module-level ``apply_rotary_pos_emb(q, k, cos, sin)`` on ``(B, H, N, D)`` queries and keys.
``apply_to_qwen2_vl(model)``:

1. replaces each text ``Qwen2VLRotaryEmbedding`` of the model by ``MRopePositions``, whose forward
   returns ``(positions (3, B, N), MRopeSpec(section, theta))`` in place of ``(cos, sin)``: no tables;
2. installs (once per process) a dispatching ``apply_rotary_pos_emb`` in the modeling module: when
   its ``sin`` argument is an ``MRopeSpec`` it rotates ``q`` and ``k`` with ``lk.mrope`` (strided, no
   copy of the transposed views); otherwise it calls transformers' own function, so models that
   were not patched compute exactly what they did before.

The vision tower's RoPE is left alone. Only the default rope type (plain M-RoPE, attention scaling
1) is supported; anything else raises ``ValueError`` at patch time rather than computing something
different. In low precision the result can differ from transformers in the last bit: transformers
rounds cos/sin to the model dtype before multiplying, ``mrope`` rotates in float32 and rounds once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor, nn

from .. import reference
from ..rope import mrope

__all__ = ["apply_to_qwen2_vl", "MRopePositions", "MRopeSpec"]


@dataclass(frozen=True)
class MRopeSpec:
    """What the patched attention needs besides the positions: the rotation's parameters."""

    section: Tuple[int, int, int]
    theta: float


class MRopePositions(nn.Module):
    """Stands in for ``Qwen2VLRotaryEmbedding``: hands the 3D positions on instead of cos/sin."""

    def __init__(self, spec: MRopeSpec):
        super().__init__()
        self.spec = spec

    def forward(self, x: Tensor, position_ids: Tensor) -> Tuple[Tensor, MRopeSpec]:
        return position_ids.expand(3, -1, -1), self.spec

    def extra_repr(self) -> str:
        return f"mrope_section={list(self.spec.section)}, theta={self.spec.theta}"


def _rotate(x: Tensor, positions: Tensor, spec: MRopeSpec, unsqueeze_dim: int) -> Tensor:
    if unsqueeze_dim not in (1, 2):
        raise ValueError(f"unsqueeze_dim must be 1 (B, H, N, D) or 2 (B, N, H, D) for M-RoPE, got {unsqueeze_dim}")
    bshd = x.transpose(1, 2) if unsqueeze_dim == 1 else x
    pos = positions.expand(3, bshd.shape[0], bshd.shape[1])
    out = mrope(bshd, pos, mrope_section=spec.section, theta=spec.theta)
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out


def _make_dispatch(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if isinstance(sin, MRopeSpec):
            return _rotate(q, cos, sin, unsqueeze_dim), _rotate(k, cos, sin, unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.latte_original = original
    apply_rotary_pos_emb.__doc__ = original.__doc__
    return apply_rotary_pos_emb


def _spec_of(rotary: nn.Module) -> MRopeSpec:
    """The (section, theta) of a text rotary module, checked to be plain M-RoPE."""
    config = rotary.config
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = getattr(rotary, "rope_type", params.get("rope_type", "default"))
    if rope_type != "default" or getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise ValueError(f"apply_to_qwen2_vl supports the default M-RoPE only, got rope_type={rope_type!r} "
                         f"with attention_scaling={getattr(rotary, 'attention_scaling', 1.0)}")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    section = tuple(int(s) for s in rotary.mrope_section)
    inv_freq = rotary.inv_freq.detach().float().cpu()
    head_dim = 2 * inv_freq.numel()
    if theta is None or len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"cannot read M-RoPE parameters from the model: theta={theta}, mrope_section={section}, head_dim={head_dim}")
    if not torch.equal(inv_freq, reference.mrope_inv_freq(head_dim, float(theta))):
        raise ValueError("the model's rotary inv_freq is not theta ** (-2j/D) (a scaled or modified RoPE); "
                         "apply_to_qwen2_vl would change its results, so it refuses to patch it")
    return MRopeSpec(section, float(theta))


def apply_to_qwen2_vl(model: nn.Module) -> nn.Module:
    """Makes the text decoder of a transformers Qwen2-VL ``model`` rotate q/k with ``lk.mrope``.

    ``model``: a ``Qwen2VLForConditionalGeneration``, ``Qwen2VLModel`` or ``Qwen2VLTextModel``
    (transformers 5.x). Patches in place and returns ``model``; calling it twice is harmless.
    Raises ``TypeError`` when ``model`` holds no Qwen2-VL text rotary embedding and ``ValueError`` for
    an unsupported rope configuration.
    """
    from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(hf.Qwen2VLRotaryEmbedding, "recomposition_frequencies"):
        raise RuntimeError("apply_to_qwen2_vl needs transformers 5.x, where Qwen2VLRotaryEmbedding returns recomposed "
                           "cos/sin; this transformers has the older API")
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, hf.Qwen2VLRotaryEmbedding)]
    already = any(isinstance(mod, MRopePositions) for mod in model.modules())
    if not targets and not already:
        raise TypeError(f"model ({type(model).__name__}) holds no Qwen2VLRotaryEmbedding: is it a Qwen2-VL model?")
    specs = [(name, _spec_of(mod)) for name, mod in targets]  # check all before changing anything
    for name, spec in specs:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, MRopePositions(spec))
    if not hasattr(hf.apply_rotary_pos_emb, "latte_original"):
        hf.apply_rotary_pos_emb = _make_dispatch(hf.apply_rotary_pos_emb)
    return model
