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

Periodic checkpoints go to ``<checkpoint_dir>/step_<k>`` and ``<checkpoint_dir>/latest`` names the
newest (a one-line file replaced atomically after the directory is complete).
"""
from __future__ import annotations

import itertools
import math
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import numpy as np
import torch

from .checkpoint import atomic_write_bytes, load_state, load_trainer_state, save_checkpoint
from .context import Context

LATEST = "latest"


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


def latest_checkpoint(checkpoint_dir: str) -> Optional[str]:
    """The newest complete checkpoint under ``checkpoint_dir`` (per its ``latest`` file), or None."""
    f = os.path.join(checkpoint_dir, LATEST)
    if not os.path.isfile(f):
        return None
    with open(f) as fh:
        name = fh.read().strip()
    path = os.path.join(checkpoint_dir, name)
    return path if os.path.isdir(path) else None


def _save_periodic(model, optimizer, step, loss_gen, checkpoint_dir, keep) -> str:
    name = f"step_{step:08d}"
    path = save_checkpoint(model, os.path.join(checkpoint_dir, name), trainer_state={
        "step": step, "optimizer": optimizer.state_dict(), "rng": _rng_state(loss_gen)})
    atomic_write_bytes(os.path.join(checkpoint_dir, LATEST), (name + "\n").encode())
    if keep > 0:
        old = sorted(d for d in os.listdir(checkpoint_dir) if d.startswith("step_") and d != name)
        for d in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(os.path.join(checkpoint_dir, d), ignore_errors=True)
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
) -> TrainResult:
    """Trains ``model`` (a ``LatteFlowModel``) until ``steps`` optimizer steps in total.

    ``amp``: bf16 autocast; ``None`` means on for CUDA models. ``checkpoint_dir`` with
    ``checkpoint_every > 0`` saves every that many steps and at the end; ``resume=True`` continues from
    the directory's latest checkpoint if there is one, a path resumes from that checkpoint, False
    starts over. ``seed`` seeds the loss's own generator (timesteps, noise, CFG dropout) when
    starting fresh. ``callback(step, loss)`` runs after every step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be a non-negative int, got {checkpoint_every!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm!r}")
    if checkpoint_every and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir")
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
    if source is not None:
        state = load_trainer_state(source, map_location="cpu")
        if state is None:
            raise ValueError(f"checkpoint {source!r} has no trainer state to resume from")
        load_state(model, source)
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], loss_gen)
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

        bar = tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True)
    batches = _batches(data, start)
    try:
        for step in range(start, steps):
            batch = next(batches)
            if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
                raise TypeError("a batch must be (x_data, ctx) or (x_data, ctx, null_ctx)")
            x_data, ctx, null_ctx = (*batch, None) if len(batch) == 2 else batch
            with autocast:
                c, n = _as_context(model, ctx, device), _as_context(model, null_ctx, device)
                loss = model.training_loss(x_data.to(device), c, n, generator=loss_gen)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            value = float(loss.detach())
            result.losses.append(value)
            result.step = step + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
            if callback is not None:
                callback(step + 1, value)
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                result.checkpoint = _save_periodic(model, optimizer, step + 1, loss_gen, checkpoint_dir, keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return result
