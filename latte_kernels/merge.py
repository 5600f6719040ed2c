"""Merging two partial attentions over disjoint key sets (SPEC 2.3)."""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

from . import reference


def merge_attention_states(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tuple[Tensor, Tensor]:
    """``(out, lse)`` of one softmax over the union of the key sets behind ``a`` and ``b``."""
    return reference.merge_attention_states(out_a, lse_a, out_b, lse_b)
