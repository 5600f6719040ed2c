"""Checkpoints: a directory holding ``model.safetensors`` and ``config.json`` (plus ``trainer.pt`` for
resuming training, and any extra files the caller hands over, e.g. ``tokenizer.json``). Saving is
atomic: everything is written into a temporary sibling directory and moved into place with
``os.replace``; ``clean_temporaries`` removes what a killed save left behind.

What is stored:
- ``couple`` / ``vanilla_couple``: the generation path only (every tensor not under ``backbone.``);
  the frozen backbone comes from where it always comes from (pretrained weights, or the seeded
  random backbone of the digits model). ``include_backbone=True`` stores it too, so the checkpoint
  alone rebuilds the model.
- ``blend`` / ``vanilla_blend``: the whole model (the backbone trains). Tensors shared between the
  backbone and the groups (blend's q/k/v/o) are stored once, under their backbone name.

``config.json`` = ``{"format": 1, "latteflow": cfg.to_dict(), "backbone": backbone config,
"includes_backbone": bool, "metadata": {...}, "files": {name: {"sha256": hex, "bytes": n}}}``.

Integrity (SPEC 3.2): ``files`` records the SHA-256 and size of every other file of the directory,
written last, at save. Each file is verified when it is read (``model.safetensors`` by ``load_state``,
``trainer.pt`` by ``load_trainer_state``; ``verify_file`` for the caller's own files): a mismatch, a
truncated or grown file, a file the config does not record, or a ``config.json`` that is not a JSON
object of this format raises one ``ValueError`` naming the file. ``record_checksums`` records the
digests of a checkpoint written before they were recorded (only for files you trust).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import Tensor

from latteflow.core.files import _fsync_dir, atomic_write
from latteflow.core.config import LatteFlowConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINER_NAME = "trainer.pt"
FILES_KEY = "files"
FORMAT = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    with atomic_write(path) as f:
        f.write(data)


# ------------------------------------------------------------------------------------------------
# digests
def file_digest(path: str) -> Dict[str, Any]:
    """``{"sha256": hex digest, "bytes": size}`` of the file at ``path`` (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": size}


def _check_entry(entry, where: str) -> Dict[str, Any]:
    if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"])
            or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int) or entry["bytes"] < 0):
        raise ValueError(f"{where} must be {{'sha256': 64 lowercase hex digits, 'bytes': a size}}, got {entry!r}")
    return entry


def verify_file(path: str, entry: Optional[Mapping[str, Any]], recorded_in: str, *, hash: bool = True) -> None:
    """Checks the file at ``path`` against its recorded digest ``entry`` (``{"sha256", "bytes"}``,
    from the file ``recorded_in``); FileNotFoundError if it is missing, ValueError naming it otherwise.
    ``hash=False`` checks only that it exists at the recorded size (cheap)."""
    if entry is None:
        raise ValueError(
            f"{path}: {recorded_in} records no SHA-256 for it (a checkpoint written before checksums were "
            f"recorded? if you trust its files, latteflow.core.checkpoint.record_checksums(folder) records them)")
    _check_entry(entry, f"{recorded_in}: the digest of {os.path.basename(path)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (recorded in {recorded_in})")
    size = os.path.getsize(path)
    if size < entry["bytes"]:
        raise ValueError(f"{path}: truncated, {size} of the {entry['bytes']} bytes recorded in {recorded_in}")
    if not hash:
        if size != entry["bytes"]:
            raise ValueError(f"{path}: {size} bytes, {recorded_in} records {entry['bytes']} (corrupt or replaced)")
        return
    got = file_digest(path)
    if got["bytes"] != entry["bytes"]:
        raise ValueError(f"{path}: {got['bytes']} bytes, {recorded_in} records {entry['bytes']} (corrupt or replaced)")
    if got["sha256"] != entry["sha256"]:
        raise ValueError(f"{path}: SHA-256 {got['sha256'][:16]}... does not match the {entry['sha256'][:16]}... "
                         f"recorded in {recorded_in} (corrupt or modified)")


def _plain_name(name, where: str) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or name == CONFIG_NAME):
        raise ValueError(f"{where}: {name!r} is not a plain file name of the checkpoint")
    return name


def verify_checkpoint_file(path: str, name: str, config: Optional[Dict[str, Any]] = None) -> str:
    """Verifies the file ``name`` of the checkpoint directory ``path`` against its ``config.json``;
    returns the file's path."""
    config = read_config(path) if config is None else config
    cfg_file = os.path.join(os.fspath(path), CONFIG_NAME)
    verify_file(os.path.join(os.fspath(path), name), config.get(FILES_KEY, {}).get(name), cfg_file)
    return os.path.join(os.fspath(path), name)


def verify_checkpoint(path: str) -> Dict[str, Any]:
    """Verifies every file ``config.json`` records, and that the weights file is among them; returns
    the config."""
    config = read_config(path)
    for name in sorted(set(config.get(FILES_KEY, {})) | {WEIGHTS_NAME}):
        verify_checkpoint_file(path, name, config)
    return config


def incomplete_reason(path: str) -> Optional[str]:
    """None when ``path`` is a checkpoint directory whose config parses and whose recorded files (the
    weights among them) all exist at their recorded sizes, else what is wrong. The cheap check of a
    finished save; ``verify_checkpoint`` also hashes the files."""
    try:
        config = read_config(path)
        files = config.get(FILES_KEY, {})
        for name in sorted(set(files) | {WEIGHTS_NAME}):
            verify_file(os.path.join(path, name), files.get(name), os.path.join(path, CONFIG_NAME), hash=False)
    except (OSError, ValueError) as e:
        return str(e)
    return None


def record_checksums(path: str) -> Dict[str, Any]:
    """Records the SHA-256 of every file of the checkpoint directory ``path`` (except ``config.json``)
    in its ``config.json`` (rewritten atomically); returns the recorded ``files``. For checkpoints
    written before checksums were recorded: it vouches for the files as they are now."""
    config = read_config(path)
    names = sorted(n for n in os.listdir(path) if n != CONFIG_NAME and os.path.isfile(os.path.join(path, n))
                   and not n.startswith("."))
    config[FILES_KEY] = {n: file_digest(os.path.join(path, n)) for n in names}
    atomic_write_bytes(os.path.join(path, CONFIG_NAME), (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return config[FILES_KEY]


# ------------------------------------------------------------------------------------------------
# saving
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
                    include_backbone: bool = False, metadata: Optional[Dict[str, Any]] = None,
                    files: Optional[Mapping[str, bytes]] = None) -> str:
    """Saves ``model`` (a ``LatteFlowModel``) to the directory ``path`` atomically; returns ``path``.

    ``trainer_state`` (optimizer state, step, RNG states: see ``latteflow.training.loop``) goes to
    ``trainer.pt``; ``files`` (name -> bytes) are written beside the weights in the same atomic step
    (e.g. ``tokenizer.json``). ``config.json`` records every file's SHA-256 and is written last. An
    existing directory at ``path`` is replaced."""
    from safetensors.torch import save_file

    if not hasattr(model, "cfg") or not isinstance(model.cfg, LatteFlowConfig):
        raise TypeError(f"model must be a LatteFlowModel, got {type(model).__name__}")
    files = dict(files or {})
    for name, data in files.items():
        _plain_name(name, "files")
        if name in (WEIGHTS_NAME, TRAINER_NAME) or not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"files[{name!r}] must be bytes under a name other than {WEIGHTS_NAME}, {TRAINER_NAME}")
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".tmp-", dir=parent)
    try:
        state = _stored_state(model, include_backbone)
        save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, TRAINER_NAME))
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        config = {
            "format": FORMAT,
            "latteflow": model.cfg.to_dict(),
            "backbone": _backbone_config(model),
            "includes_backbone": bool(include_backbone or model.cfg.is_blend),
            "metadata": metadata or {},
            FILES_KEY: {name: file_digest(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))},
        }
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
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


_TMP_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]+$")  # save_checkpoint's
_TMP_FILE = re.compile(r"^\..+\.[a-z0-9_]+\.tmp$")  # _io.atomic_write's


def clean_temporaries(folder: str) -> List[str]:
    """Removes what a killed ``save_checkpoint`` or ``atomic_write`` left in ``folder`` (``.NAME.tmp-*``
    directories, ``.NAME.*.tmp`` files); returns the names removed. A kill between the two renames of
    a replacing save leaves ``NAME`` missing and the old checkpoint in ``.NAME.old-*``: it is put back.
    Only for folders no other process is writing to at the same time."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for entry in sorted(os.listdir(folder)):
        full = os.path.join(folder, entry)
        m = _TMP_DIR.match(entry)
        if m and os.path.isdir(full) and not os.path.islink(full):
            target = os.path.join(folder, m.group("name"))
            old = os.path.join(full, "ckpt")
            if m.group("kind") == "old" and not os.path.exists(target) and os.path.isdir(old):
                os.replace(old, target)
            shutil.rmtree(full, ignore_errors=True)
            removed.append(entry)
        elif _TMP_FILE.match(entry) and os.path.isfile(full) and not os.path.islink(full):
            os.unlink(full)
            removed.append(entry)
    if removed:
        _fsync_dir(folder)
    return removed


# ------------------------------------------------------------------------------------------------
# loading
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_config(path: str) -> Dict[str, Any]:
    """The parsed and checked ``config.json`` of a checkpoint directory; FileNotFoundError when there
    is none, ValueError naming the file when it is not a config of this format."""
    f = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(f):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r} (missing {CONFIG_NAME})")
    try:
        with open(f, "rb") as fh:
            config = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: not a JSON checkpoint config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{f}: must hold a JSON object, got a JSON {_json_kind(config)}")
    if config.get("format") != FORMAT:
        raise ValueError(f"{f}: checkpoint format {config.get('format')!r}, this code reads {FORMAT}")
    try:
        LatteFlowConfig.from_dict(config.get("latteflow"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f}: 'latteflow' is not a LatteFlowConfig ({e})") from None
    for key, kinds, words in (("backbone", (dict, type(None)), "an object or null"),
                              ("includes_backbone", (bool,), "a boolean"), ("metadata", (dict,), "an object"),
                              (FILES_KEY, (dict,), "an object")):
        if key in config and not isinstance(config[key], kinds):
            raise ValueError(f"{f}: {key!r} must be {words}, got a JSON {_json_kind(config[key])}")
    config.setdefault("metadata", {})
    for name, entry in config.get(FILES_KEY, {}).items():
        _check_entry(entry, f"{f}: files[{_plain_name(name, f + ': files')!r}]")
    return config


def build_recorded_backbone(path: str, config: Optional[Dict[str, Any]] = None, build=None):
    """The Qwen2-VL model the checkpoint's ``backbone`` config describes, made by ``build(config)``
    (default: ``Qwen2VLForConditionalGeneration``); ValueError naming ``config.json`` when the recorded
    config is missing or transformers refuses it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = read_config(path) if config is None else config
    where = os.path.join(os.fspath(path), CONFIG_NAME)
    if config.get("backbone") is None:
        raise ValueError(f"{where}: records no backbone config")
    try:
        return (build or Qwen2VLForConditionalGeneration)(Qwen2VLConfig.from_dict(config["backbone"]))
    except Exception as e:  # transformers' and huggingface_hub's validation errors are not all ValueErrors
        raise ValueError(f"{where}: 'backbone' is not a usable Qwen2-VL config ({_first_line(e)})") from None


def _load_weights(path: str, config: Dict[str, Any]) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    f = verify_checkpoint_file(path, WEIGHTS_NAME, config)
    try:
        return load_file(f)
    except Exception as e:  # SafetensorError and friends: the file matched its digest but is no safetensors
        raise ValueError(f"{f}: not a readable safetensors file ({_first_line(e)})") from None


def load_state(model, path: str, *, strict: bool = True):
    """Loads a checkpoint's weights into an existing ``model`` in place (its config must match the
    saved one in variant, groups and shapes). Returns ``model``."""
    config = read_config(path)
    saved = LatteFlowConfig.from_dict(config["latteflow"])
    for name in ("variant", "num_groups", "latent_channels", "grid_hw", "patch_size", "residual_attention"):
        if getattr(saved, name) != getattr(model.cfg, name):
            raise ValueError(f"checkpoint {name}={getattr(saved, name)!r} differs from the model's {getattr(model.cfg, name)!r}")
    state = _load_weights(path, config)
    weights = os.path.join(os.fspath(path), WEIGHTS_NAME)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"{weights}: holds tensors the model lacks: {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
    if strict:
        expected = set(_stored_state(model, config.get("includes_backbone", False)))
        missing = sorted(expected - set(state))
        if missing:
            raise ValueError(f"{weights}: lacks tensors of the model its config describes: "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, t in state.items():
            if own[name].shape != t.shape:
                raise ValueError(f"{weights}: {name} has shape {tuple(t.shape)}, the model its config describes "
                                 f"{tuple(own[name].shape)}")
            own[name].copy_(t)
    return model


def load_checkpoint(path: str, backbone=None, *, device=None, dtype=None, **overrides):
    """Builds a ``LatteFlowModel`` from a checkpoint directory.

    ``backbone``: the Qwen2-VL model to build on. ``None`` builds one from the saved backbone config,
    which needs a checkpoint that holds the backbone (blend, or ``include_backbone=True``).
    ``overrides`` replace config fields that do not change shapes (e.g. ``backend="reference"``)."""
    from latteflow.core.model import LatteFlowModel

    config = read_config(path)
    d = dict(config["latteflow"])
    d.update(overrides)
    cfg = LatteFlowConfig.from_dict(d)
    if backbone is None:
        if not config.get("includes_backbone") or config.get("backbone") is None:
            raise ValueError(f"checkpoint {path!r} does not hold the backbone's weights: pass backbone=")
        backbone = build_recorded_backbone(path, config)
    if device is not None or dtype is not None:
        backbone = backbone.to(device=device, dtype=dtype)
    model = LatteFlowModel(backbone, cfg)
    load_state(model, path)
    return model.eval()


def load_trainer_state(path: str, map_location=None) -> Optional[Dict[str, Any]]:
    """The ``trainer.pt`` of a checkpoint directory (verified against its recorded SHA-256), or None if
    the checkpoint has none."""
    config = read_config(path)
    f = os.path.join(os.fspath(path), TRAINER_NAME)
    if not os.path.isfile(f) and TRAINER_NAME not in config.get(FILES_KEY, {}):
        return None
    verify_checkpoint_file(path, TRAINER_NAME, config)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # matched its digest yet unreadable: written by an incompatible torch
        raise ValueError(f"{f}: not a readable trainer state ({_first_line(e)})") from None
