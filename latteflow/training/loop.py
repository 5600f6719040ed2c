"""Training loop for layerwise flow matching: AdamW, bf16 autocast on GPU, gradient clipping, tqdm,
periodic atomic checkpoints and exact resume (SPEC 3).

``train(model, data, steps=...)`` is what a CLI calls. ``data`` yields batches ``(x_data, ctx,
null_ctx)``: ``x_data`` latents ``(B, C, H, W)``; ``ctx`` / ``null_ctx`` either ``Context`` objects or
dicts of ``build_context`` keyword arguments (``{"input_ids": ..., "attention_mask": ...}``), which the
loop turns into contexts inside the step (with gradients for blend, whose backbone trains);
``null_ctx`` may be None (no CFG dropout). ``data`` is either a callable ``step -> batch`` or an
iterable (re-iterated when exhausted). Resuming from step k calls ``data(k), data(k+1), ...``, or
skips the first k batches of the iterable, so a resumed run sees the batches an uninterrupted one
would have seen provided the iterable replays identically.

Exact resume: a checkpoint saved at step k stores the model, the AdamW state, the step, the loss
generator and the global torch / CUDA / numpy / python RNG states; training k steps, saving,
loading into a fresh model and training N-k more gives the same weights as N steps in one go.

Periodic checkpoints go to ``<checkpoint_dir>/step_<k>`` (atomic directories, every file's SHA-256 in
their config) and ``<checkpoint_dir>/latest`` names the newest (a one-line file replaced atomically
after the directory is complete; informative only: resume takes the newest *complete* ``step_<k>``,
so a kill between the directory and ``latest`` loses nothing). With an ``EMA`` its weights go to
``<checkpoint_dir>/ema/step_<k>.safetensors`` before the directory (whose config records the EMA
file's SHA-256) and are pruned with it: ``ema/`` holds one file per kept checkpoint. Each run starts
by removing what a killed run left: temporaries of interrupted saves and EMA files whose checkpoint
was never completed.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch

from latteflow.core.checkpoint import (atomic_write_bytes, clean_temporaries, file_digest, incomplete_reason, load_state,
                         load_trainer_state, read_config, save_checkpoint, verify_file)
from latteflow.core.context import Context

LATEST = "latest"
EMA_DIR = "ema"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_EMA_FILE = re.compile(r"^(step_\d+)\.safetensors$")


@dataclass
class TrainResult:
    """What ``train`` did: the final step, this call's per-step losses, the last checkpoint written."""

    step: int
    losses: List[float] = field(default_factory=list)
    checkpoint: Optional[str] = None


def _rng_state(loss_gen: torch.Generator) -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "loss_generator": loss_gen.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any], loss_gen: torch.Generator) -> None:
    loss_gen.set_state(state["loss_generator"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(checkpoint_dir: str) -> List[Tuple[int, str]]:
    """``[(k, path)]`` of the ``step_<k>`` directories under ``checkpoint_dir``, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for d in os.listdir(checkpoint_dir):
        m = _STEP_DIR.match(d)
        if m and os.path.isdir(os.path.join(checkpoint_dir, d)):
            found.append((int(m.group(1)), os.path.join(checkpoint_dir, d)))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest complete ``step_<k>`` checkpoint under ``checkpoint_dir`` (its config parses, its
    recorded files exist at their sizes), or None. The ``latest`` file is not trusted: a kill after the
    directory and before ``latest`` leaves the newest step complete and unnamed."""
    for _, path in reversed(checkpoint_steps(checkpoint_dir)):
        if incomplete_reason(path) is None:
            return path
    return None


def clean_checkpoint_dir(checkpoint_dir: str) -> List[str]:
    """Removes what a killed run left under ``checkpoint_dir``: temporaries of interrupted saves (there
    and in ``ema/``) and EMA files whose checkpoint directory does not exist. Returns the names removed."""
    removed = clean_temporaries(checkpoint_dir)
    ema_dir = os.path.join(checkpoint_dir, EMA_DIR)
    removed += [os.path.join(EMA_DIR, n) for n in clean_temporaries(ema_dir)]
    if os.path.isdir(ema_dir):
        steps = {os.path.basename(p) for _, p in checkpoint_steps(checkpoint_dir)}
        for n in sorted(os.listdir(ema_dir)):
            m = _EMA_FILE.match(n)
            if m and m.group(1) not in steps:
                os.unlink(os.path.join(ema_dir, n))
                removed.append(os.path.join(EMA_DIR, n))
    return removed


class EMA:
    """Exponential moving average of the trainable weights, decay ``min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, model, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must lie in [0, 1), got {decay!r}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = {n: params[n].detach().clone() for n in self.names}
        self.updates = 0

    @torch.no_grad()
    def update(self, model) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        params = dict(model.named_parameters())
        for n in self.names:
            self.shadow[n].lerp_(params[n].detach(), 1.0 - d)

    @torch.no_grad()
    def copy_to(self, model) -> None:
        params = dict(model.named_parameters())
        for n in self.names:
            params[n].copy_(self.shadow[n])

    def save(self, path: str) -> Dict[str, Any]:
        """Writes the shadow weights to ``path`` (safetensors, atomically); returns the file's digest."""
        from safetensors.torch import save

        meta = {"updates": str(self.updates), "decay": repr(self.decay)}
        atomic_write_bytes(path, save({n: t.contiguous().cpu() for n, t in self.shadow.items()}, metadata=meta))
        return file_digest(path)

    def load(self, path: str, digest: Optional[Dict[str, Any]] = None, recorded_in: str = "") -> None:
        """Reads ``path`` (first checked against ``digest``, recorded in the file ``recorded_in``)."""
        from safetensors import safe_open

        if digest is not None:
            verify_file(path, digest, recorded_in)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                stored = {n: f.get_tensor(n) for n in f.keys()}
        except Exception as e:  # SafetensorError: a file no digest vouched for
            raise ValueError(f"{path}: not a readable EMA file ({type(e).__name__}: {e})") from None
        missing = sorted(set(self.names) - set(stored))
        if missing:
            raise ValueError(f"{path}: lacks the EMA of {missing[:3]}{'...' if len(missing) > 3 else ''}")
        for n in self.names:
            self.shadow[n].copy_(stored[n])
        self.updates = int(meta.get("updates", 0))


def _ema_path(checkpoint: str) -> str:
    return os.path.join(os.path.dirname(checkpoint), EMA_DIR, os.path.basename(checkpoint) + ".safetensors")


def _load_ema(ema: EMA, checkpoint: str) -> None:
    config = read_config(checkpoint)
    recorded_in = os.path.join(checkpoint, "config.json")
    entry = (config.get("metadata") or {}).get("ema")
    if not isinstance(entry, dict):
        raise ValueError(f"{recorded_in}: records no EMA file to resume the EMA from")
    ema.load(_ema_path(checkpoint), entry, recorded_in)


def _save_periodic(model, optimizer, step, loss_gen, checkpoint_dir, keep, ema: Optional[EMA] = None,
                   extra: Optional[Dict[str, Any]] = None) -> str:
    name = f"step_{step:08d}"
    metadata = dict(extra or {})
    if ema is not None:  # first, so a complete step directory always has its EMA
        metadata["ema"] = ema.save(os.path.join(checkpoint_dir, EMA_DIR, name + ".safetensors"))
    path = save_checkpoint(model, os.path.join(checkpoint_dir, name), metadata=metadata, trainer_state={
        "step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(loss_gen)})
    atomic_write_bytes(os.path.join(checkpoint_dir, LATEST), (name + "\n").encode())
    if keep > 0:
        old = [p for _, p in checkpoint_steps(checkpoint_dir) if os.path.basename(p) != name]
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    clean_checkpoint_dir(checkpoint_dir)  # the EMA files of the pruned steps
    return path


def _batches(data, start: int):
    if callable(data):
        for step in itertools.count(start):
            yield data(step)
    else:
        skipped = 0
        while True:
            empty = True
            for batch in data:
                empty = False
                if skipped < start:
                    skipped += 1
                    continue
                yield batch
            if empty:
                raise ValueError("data yielded no batch")


def _as_context(model, c: Union[Context, Dict[str, Any], None], device) -> Optional[Context]:
    if c is None or isinstance(c, Context):
        return None if c is None else c.to(device)
    if isinstance(c, dict):
        return model.build_context(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in c.items()})
    raise TypeError(f"a batch's context must be a Context, a dict of build_context arguments or None, got {type(c).__name__}")


def check_same_run(path: str, settings: Dict[str, Any], flags: Optional[Dict[str, str]] = None) -> None:
    """A resumed run must use the settings its checkpoints were trained with: each key of ``settings``
    that the JSON object at ``path`` (a run's ``run.json``) also holds must be equal there; ``flags`` names
    the command-line flag of a key for the error. No file: a new run, nothing to check."""
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    for key, value in settings.items():
        if key in saved and saved[key] != value:
            flag = (flags or {}).get(key, key)
            named = f"{key} " if flag != key else ""
            raise ValueError(f"resume: {flag} must stay as the run was started ({named}{saved[key]!r}, now "
                             f"{value!r}; see {path})")


def check_trainer_args(lr, max_grad_norm, checkpoint_every: int, checkpoint_dir) -> None:
    """The settings both trainers (``train`` here, ``train_distributed``) check alike: a finite positive
    ``lr``, a positive ``max_grad_norm`` or None, and a ``checkpoint_dir`` when ``checkpoint_every``."""
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")


def train(
    model,
    data: Union[Callable[[int], Any], Iterable],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    max_grad_norm: Optional[float] = 1.0,
    amp: Optional[bool] = None,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 2,
    resume: Union[bool, str] = True,
    seed: int = 0,
    progress: bool = True,
    callback: Optional[Callable[[int, float], None]] = None,
    ema: Optional[EMA] = None,
    accumulation: int = 1,
    metadata: Optional[Dict[str, Any]] = None,
) -> TrainResult:
    """Trains ``model`` (a ``LatteFlowModel``) until ``steps`` optimizer steps in total.

    ``amp``: bf16 autocast; ``None`` means on for CUDA models. ``checkpoint_dir`` with
    ``checkpoint_every > 0`` saves every that many steps and at the end; ``resume=True`` continues from
    the directory's latest checkpoint if there is one, a path resumes from that checkpoint, False
    starts over. ``seed`` seeds the loss's own generator (timesteps, noise, CFG dropout) when
    starting fresh. ``callback(step, loss)`` runs after every step. ``ema``: updated after every
    optimizer step, saved with every checkpoint and restored on resume. ``progress``: a tqdm bar,
    shown when stderr is a terminal (tqdm decides). ``accumulation``: micro-batches per optimizer step
    (gradients summed over them, each loss divided by ``accumulation``; the loss reported is their
    mean); a callable ``data`` is then called with the micro-batch index ``step * accumulation + i``.
    ``metadata``: recorded in every checkpoint's config (``metadata``, beside ``ema``), e.g.
    what ``load_pipeline`` needs to open a step checkpoint on its own."""
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"accumulation must be a positive int, got {accumulation!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a non-negative int, got {checkpoint_every!r}")
    check_trainer_args(lr, max_grad_norm, checkpoint_every, checkpoint_dir)
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be a latteflow.training.loop.EMA or None, got {type(ema).__name__}")
    if checkpoint_dir is not None:
        clean_checkpoint_dir(checkpoint_dir)
    device = model.device
    amp = device.type == "cuda" if amp is None else bool(amp)
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    loss_gen = torch.Generator(device=device)
    loss_gen.manual_seed(seed)
    start = 0
    source = None
    if isinstance(resume, (str, os.PathLike)):
        source = os.fspath(resume)
    elif resume and checkpoint_dir is not None:
        source = latest_checkpoint(checkpoint_dir)
        found = checkpoint_steps(checkpoint_dir)
        if source is None and found:
            raise ValueError(f"resume: no complete checkpoint under {checkpoint_dir!r}; the newest, "
                             f"{os.path.basename(found[-1][1])}: {incomplete_reason(found[-1][1])}")
    if source is not None:
        state = load_trainer_state(source, map_location="cpu")
        if state is None:
            raise ValueError(f"checkpoint {source!r} has no trainer state to resume from")
        load_state(model, source)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], loss_gen)
        if ema is not None:
            _load_ema(ema, source)
        start = int(state["step"])
    result = TrainResult(step=start, checkpoint=source)
    if start >= steps:
        return result
    was_training = model.training
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True, disable=None)
    batches = _batches(data, start * accumulation)
    try:
        for step in range(start, steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(accumulation):
                batch = next(batches)
                if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                    raise TypeError("a batch must be (x_data, ctx) or (x_data, ctx, null_ctx)")
                x_data, ctx, null_ctx = (*batch, None) if len(batch) == 2 else batch
                with autocast:
                    c, n = _as_context(model, ctx, device), _as_context(model, null_ctx, device)
                    loss = model.training_loss(x_data.to(device), c, n, generator=loss_gen)
                (loss / accumulation if accumulation > 1 else loss).backward()
                total += float(loss.detach())
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            value = total / accumulation
            if ema is not None:
                ema.update(model)
            result.losses.append(value)
            result.step = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(step + 1, value)
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                result.checkpoint = _save_periodic(model, optimizer, step + 1, loss_gen, checkpoint_dir,
                                                   keep_checkpoints, ema, metadata)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return result
