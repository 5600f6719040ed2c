"""A pretrained Qwen2-VL backbone from a local folder, pinned by the SHA-256 of its weights (SPEC 3.2).

``backbone_record(folder)`` is what a checkpoint stores (``{"folder": absolute path, "sha256": hex}``,
the digest of ``latteflow.core.files.weights_sha256``); ``load_pretrained_backbone(folder, sha256=...)``
loads it with ``Qwen2VLForConditionalGeneration.from_pretrained`` (bfloat16 on CUDA, float32 on CPU by
default) after checking the digest: a folder whose weights differ from the recorded ones is refused
with a ValueError naming it, whichever folder the user points at.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from latteflow.core.files import weights_sha256

__all__ = ["backbone_record", "check_backbone_folder", "default_dtype", "load_pretrained_backbone"]


def default_dtype(device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _folder(folder, what: str = "backbone") -> str:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{what} folder must be a path, got {type(folder).__name__}")
    path = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder {path!r} does not exist")
    return path


def backbone_record(folder) -> Dict[str, str]:
    """``{"folder": absolute path, "sha256": digest of its weight files}``."""
    path = _folder(folder)
    return {"folder": path, "sha256": weights_sha256(path)["sha256"]}


def check_backbone_folder(folder, sha256: str, what: str = "backbone") -> str:
    """The absolute ``folder`` when its weights' digest is ``sha256``; ValueError naming it otherwise."""
    path = _folder(folder, what)
    got = weights_sha256(path)["sha256"]
    if got != sha256:
        raise ValueError(f"{what} folder {path!r}: weights SHA-256 {got[:16]}... differ from the {sha256[:16]}... "
                         f"the checkpoint was trained on (a different or modified model)")
    return path


def load_pretrained_backbone(folder, *, sha256: Optional[str] = None, device=None,
                             dtype: Optional[torch.dtype] = None):
    """``Qwen2VLForConditionalGeneration.from_pretrained(folder)`` in eval mode on ``device`` (default CPU),
    ``dtype`` defaulting to ``default_dtype(device)``; with ``sha256`` the weights are checked first."""
    from transformers import Qwen2VLForConditionalGeneration

    device = torch.device("cpu" if device is None else device)
    path = check_backbone_folder(folder, sha256) if sha256 is not None else _folder(folder)
    dtype = default_dtype(device) if dtype is None else dtype
    try:
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"backbone folder {path!r}: not a Qwen2-VL model from_pretrained can read ({first})") from None
    return model.to(device).eval()
