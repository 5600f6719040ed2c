"""Checkpoints: a directory holding ``model.safetensors`` and ``config.json`` (plus ``trainer.pt`` for
resuming training). Saving is atomic: everything is written into a temporary sibling directory and
moved into place with ``os.replace``.

What is stored:
- ``couple`` / ``vanilla_couple``: the generation path only (every tensor not under ``backbone.``);
  the frozen backbone comes from where it always comes from (pretrained weights, or the seeded
  random backbone of the digits model). ``include_backbone=True`` stores it too, so the checkpoint
  alone rebuilds the model.
- ``blend`` / ``vanilla_blend``: the whole model (the backbone trains). Tensors shared between the
  backbone and the groups (blend's q/k/v/o) are stored once, under their backbone name.

``config.json`` = ``{"format": 1, "latteflow": cfg.to_dict(), "backbone": backbone config,
"includes_backbone": bool, "metadata": {...}}``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ._io import _fsync_dir, atomic_write
from .config import LatteFlowConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINER_NAME = "trainer.pt"
FORMAT = 1


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    with atomic_write(path) as f:
        f.write(data)


def _stored_state(model, include_backbone: bool) -> Dict[str, Tensor]:
    """The tensors a checkpoint holds, each storage once, contiguous and on CPU."""
    keep_backbone = include_backbone or model.cfg.is_blend
    out: Dict[str, Tensor] = {}
    seen = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if not keep_backbone and name.startswith("backbone."):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:  # blend: groups.*.self_attn.* is the backbone's own module
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def _backbone_config(model) -> Optional[Dict[str, Any]]:
    cfg = getattr(model.backbone, "config", None)
    if cfg is None or not hasattr(cfg, "to_json_string"):
        return None
    return json.loads(cfg.to_json_string())


def save_checkpoint(model, path: str, *, trainer_state: Optional[Dict[str, Any]] = None,
                    include_backbone: bool = False, metadata: Optional[Dict[str, Any]] = None) -> str:
    """Saves ``model`` (a ``LatteFlowModel``) to the directory ``path`` atomically; returns ``path``.

    ``trainer_state`` (optimizer state, step, RNG states: see ``latteflow.train``) goes to
    ``trainer.pt``. An existing directory at ``path`` is replaced."""
    from safetensors.torch import save_file

    if not hasattr(model, "cfg") or not isinstance(model.cfg, LatteFlowConfig):
        raise TypeError(f"model must be a LatteFlowModel, got {type(model).__name__}")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    try:
        state = _stored_state(model, include_backbone)
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "latteflow": model.cfg.to_dict(),
            "backbone": _backbone_config(model),
            "includes_backbone": bool(include_backbone or model.cfg.is_blend),
            "metadata": metadata or {},
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, TRAINER_NAME))
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".old-", dir=parent)
            os.replace(path, os.path.join(old, "ckpt"))
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_config(path: str) -> Dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    f = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"no checkpoint at {path!r} (missing {CONFIG_NAME})")
    with open(f) as fh:
        config = json.load(fh)
    if config.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {config.get('format')!r}, this code reads {FORMAT}")
    return config


def load_state(model, path: str, *, strict: bool = True):
    """Loads a checkpoint's weights into an existing ``model`` in place (its config must match the
    saved one in variant, groups and shapes). Returns ``model``."""
    from safetensors.torch import load_file

    config = read_config(path)
    saved = LatteFlowConfig.from_dict(config["latteflow"])
    for name in ("variant", "num_groups", "latent_channels", "grid_hw", "patch_size", "residual_attention"):
        if getattr(saved, name) != getattr(model.cfg, name):
            raise ValueError(f"checkpoint {name}={getattr(saved, name)!r} differs from the model's {getattr(model.cfg, name)!r}")
    state = load_file(os.path.join(os.fspath(path), WEIGHTS_NAME))
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"checkpoint holds tensors the model lacks: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    if strict:
        expected = set(_stored_state(model, config.get("includes_backbone", False)))
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"checkpoint lacks tensors of the model: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(own[name].shape)}")
            own[name].copy_(t)
    return model


def load_checkpoint(path: str, backbone=None, *, device=None, dtype=None, **overrides):
    """Builds a ``LatteFlowModel`` from a checkpoint directory.

    ``backbone``: the Qwen2-VL model to build on. ``None`` builds one from the saved backbone config,
    which needs a checkpoint that holds the backbone (blend, or ``include_backbone=True``).
    ``overrides`` replace config fields that do not change shapes (e.g. ``backend="reference"``)."""
    from .model import LatteFlowModel

    config = read_config(path)
    d = dict(config["latteflow"])
    d.update(overrides)
    cfg = LatteFlowConfig.from_dict(d)
    if backbone is None:
        if not config.get("includes_backbone") or config.get("backbone") is None:
            raise ValueError(f"checkpoint {path!r} does not hold the backbone's weights: pass backbone=")
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        backbone = Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_dict(config["backbone"]))
    if device is not None or dtype is not None:
        backbone = backbone.to(device=device, dtype=dtype)
    model = LatteFlowModel(backbone, cfg)
    load_state(model, path)
    return model.eval()


def load_trainer_state(path: str, map_location=None) -> Optional[Dict[str, Any]]:
    """The ``trainer.pt`` of a checkpoint directory, or None if it has none."""
    f = os.path.join(os.fspath(path), TRAINER_NAME)
    if not os.path.isfile(f):
        return None
    return torch.load(f, map_location=map_location, weights_only=True)
