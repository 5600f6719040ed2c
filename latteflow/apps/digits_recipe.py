"""The digits recipe (SPEC 4): the model, data, training and scoring behind ``latteflow train --data digits``,
the shipped checkpoint and ``latteflow/experiments.py``.

- Backbone: a Qwen2-VL architecture shrunk for 2 CPU cores (hidden 64, 8 layers, 4 heads, 2 KV heads,
  MLP 128) with seeded random frozen weights and the package's character tokenizer. Its weights are
  never stored: a checkpoint records the seed and a SHA-256 of the rebuilt weights, checked on load.
- Latents: the pixel autoencoder (1 channel, patch 1): 8x8 digits in [-1, 1] = 64 image tokens.
- The frozen backbone's context for the 10 prompts and the null prompt is built once; a training batch
  gathers its rows (same numbers as building it per batch, without the repeated forward).
- EMA of the trainable weights (the exported model uses them); ``latteflow.training.loop`` saves it beside
  every periodic checkpoint so ``--resume`` continues it exactly.
- An output folder: ``checkpoints/`` (``step_<k>`` and ``ema/``, see ``latteflow.training.loop``),
  ``losses.csv`` (``step,loss``, one row per step: a resume drops the rows after its checkpoint) and
  ``model/`` (the exported EMA model with ``tokenizer.json`` and ``MANIFEST.json``, saved atomically).
  A run first removes what a killed run left (temporaries, EMA files of unfinished checkpoints).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from latteflow.text.backbones import backbone_checksum, build_backbone, tiny_qwen2vl_config
from latteflow.core.checkpoint import atomic_write_bytes, clean_temporaries, save_checkpoint
from latteflow.core.config import LatteFlowConfig
from latteflow.core.context import Context
from latteflow.data.digits import DIGIT_PROMPTS, GRID_HW, NUM_CLASSES, load_digits_split
from latteflow.core.model import LatteFlowModel
from latteflow.text.tokenizer import TOKENIZER_FILENAME, CharTokenizer
from latteflow.training.loop import EMA, EMA_DIR, check_same_run
from latteflow.data.vae import PixelAutoencoder

__all__ = ["DIGITS_BACKBONE", "EMA", "DigitsRecipe", "PromptContexts", "backbone_checksum", "build_digits_model",
           "digits_backbone_config", "evaluate_model", "sample_labels", "train_digits"]

# The shrunk Qwen2-VL text shapes of the digits model (head_dim 16; mrope_section sums to 8). The random
# weights are drawn with std 0.3 rather than transformers' 0.02: at 0.02 the frozen context keys are so
# small that attention over them is uniform and the one token naming the digit barely reaches the image
# tokens (measured: conditional accuracy at chance after 300 steps at 0.02 and 0.1, 0.79 at 0.3).
DIGITS_BACKBONE = dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, mrope_section=[2, 3, 3], initializer_range=0.3)
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
MANIFEST_NAME = "MANIFEST.json"
LOSSES_NAME = "losses.csv"


def digits_backbone_config(tokenizer: Optional[CharTokenizer] = None):
    return tiny_qwen2vl_config(tokenizer, **DIGITS_BACKBONE)


@dataclass
class DigitsRecipe:
    """What shapes a digits model. ``variant``: ``couple`` or ``vanilla_couple``."""

    variant: str = "couple"
    num_groups: int = 4
    residual_attention: bool = True
    backbone_seed: int = 0
    backend: str = "fused"

    def model_config(self) -> LatteFlowConfig:
        return LatteFlowConfig(
            variant=self.variant, num_groups=self.num_groups, residual_attention=self.residual_attention,
            latent_channels=1, grid_hw=GRID_HW, patch_size=1, backend=self.backend,
            extra={"dataset": "digits", "prompts": list(DIGIT_PROMPTS)},
        )


def build_digits_model(recipe: DigitsRecipe, init_seed: int = 0, device=None):
    """``(model, tokenizer)``: a fresh digits model on the seeded backbone, in float32; the new heads
    (input projections, timestep MLPs) are drawn from ``init_seed``."""
    if recipe.variant not in ("couple", "vanilla_couple"):
        raise ValueError(f"variant must be 'couple' or 'vanilla_couple' for the digits recipe, got {recipe.variant!r}")
    tok = CharTokenizer()
    backbone = build_backbone(digits_backbone_config(tok), seed=recipe.backbone_seed, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # the new heads' init depends on the seed only
        model = LatteFlowModel(backbone, recipe.model_config())
    return model, tok


class PromptContexts:
    """The contexts of ``"digit 0"`` .. ``"digit 9"`` and of the null prompt, built once."""

    def __init__(self, model: LatteFlowModel, tokenizer: CharTokenizer):
        ids, mask = tokenizer.encode(list(DIGIT_PROMPTS) + [""], device=model.device)
        with torch.no_grad():
            self.all = model.build_context(ids, mask)
        self.null = self.all.index_select(torch.tensor([NUM_CLASSES], device=model.device))

    def for_labels(self, labels: Tensor) -> Context:
        return self.all.index_select(labels.to(self.all.device))


def make_batches(model: LatteFlowModel, tokenizer: CharTokenizer, batch_size: int, seed: int,
                 split_seed: int = 0) -> Callable[[int], tuple]:
    """``step -> (x_data, ctx, null_ctx)``: ``batch_size`` train digits drawn with a generator seeded by
    ``(seed, step)`` only, so a resumed run sees the same batches as an uninterrupted one."""
    split = load_digits_split(split_seed)
    images = PixelAutoencoder(1, 1).encode(split.train_images)
    labels = split.train_labels
    contexts = PromptContexts(model, tokenizer)
    n = images.shape[0]

    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        return images[idx], contexts.for_labels(labels[idx]), contexts.null

    return batch


# ------------------------------------------------------------------------------------------------
# sampling and scoring
def sample_labels(model: LatteFlowModel, contexts: PromptContexts, labels: Tensor, *, steps: int = 40,
                  guidance: float = 5.0, seed: int = 0, batch_size: int = 250, progress: bool = False) -> Tensor:
    """float32 images ``(N, 1, 8, 8)`` in [-1, 1] for the digits ``labels``; the noise comes from one CPU
    generator seeded with ``seed`` (so the images do not depend on ``batch_size`` or the device).
    ``progress``: one tqdm bar over all chunks' steps."""
    from latteflow.core.sampler import progress_bar, sample

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(labels), 1, *GRID_HW), generator=g)
    out = []
    chunks = range(0, len(labels), batch_size)
    with progress_bar(len(chunks) * steps, "sampling", progress) as bar:
        for i in chunks:
            ctx = contexts.for_labels(labels[i:i + batch_size])
            x = sample(model, ctx, contexts.null, steps=steps, guidance=guidance,
                       noise=noise[i:i + batch_size].to(model.device), progress=bar)
            out.append(PixelAutoencoder(1, 1).decode(x.cpu()))
    return torch.cat(out).clamp(-1.0, 1.0)


def evaluate_model(model: LatteFlowModel, contexts: PromptContexts, *, per_class: int = 50, steps: int = 40,
                   guidance: float = 5.0, seed: int = 0, progress: bool = False) -> Dict[str, float]:
    """Samples ``per_class`` digits of each class and scores them (``latteflow.evaluation.scores``); adds the
    sampling seconds per image."""
    from latteflow.evaluation.scores import evaluate

    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    model.eval()
    t0 = time.perf_counter()
    images = sample_labels(model, contexts, labels, steps=steps, guidance=guidance, seed=seed, progress=progress)
    dt = time.perf_counter() - t0
    r = evaluate(images, labels)
    return dict(r.as_dict(), seconds_per_image=dt / len(labels), steps=steps, guidance=guidance, seed=seed,
                per_class=per_class)


# ------------------------------------------------------------------------------------------------
# training
def git_commit() -> Optional[str]:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) if commit else None


def device_description(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _positive(name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be {'a non-negative' if allow_zero else 'a positive'} int, got {value!r}")
    return value


def save_digits_model(model: LatteFlowModel, tokenizer: CharTokenizer, path: str, recipe: DigitsRecipe,
                      metadata: Optional[dict] = None, manifest: Optional[dict] = None) -> str:
    """A checkpoint ``load_pipeline`` reads: the generation path (safetensors + config.json, backbone
    seed and checksum in its metadata), ``tokenizer.json`` and ``MANIFEST.json`` (when given), written
    in one atomic save."""
    meta = dict(metadata or {})
    meta.update(backbone_seed=recipe.backbone_seed, backbone_sha256=backbone_checksum(model.backbone),
                autoencoder={"type": "pixel", "in_channels": 1, "patch_size": 1})
    files = {TOKENIZER_FILENAME: json.dumps(tokenizer.to_dict(), indent=1, ensure_ascii=False).encode("utf-8")}
    if manifest is not None:
        files[MANIFEST_NAME] = json.dumps(manifest, indent=2).encode()
    return save_checkpoint(model, path, metadata=meta, files=files)


def _loss_rows(path: str) -> Dict[int, str]:
    """``step -> line`` of the well-formed rows of ``losses.csv`` (a kill may have cut the last one short)."""
    rows: Dict[int, str] = {}
    if not os.path.isfile(path):
        return rows
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(",")
            if not line.endswith("\n") or len(parts) != 2:
                continue
            try:
                step, _ = int(parts[0]), float(parts[1])
            except ValueError:
                continue
            rows[step] = line
    return rows


def _keep_losses(path: str, upto: int) -> None:
    """Rewrites ``losses.csv`` with its rows of steps ``<= upto``: a resumed run writes the later ones again."""
    rows = _loss_rows(path)
    atomic_write_bytes(path, "".join(rows[s] for s in sorted(rows) if 1 <= s <= upto).encode())


def _final_loss(path: str, step: int) -> Optional[float]:
    """The loss of ``step`` as ``losses.csv`` holds it (also when this call trained nothing)."""
    line = _loss_rows(path).get(step)
    return None if line is None else float(line.split(",")[1])


RUN_NAME = "run.json"
_RUN_KEYS = {"seed": "--seed", "batch_size": "--batch-size", "lr": "--lr", "ema_decay": "--ema",
             "recipe": "--variant / --groups / --no-residual-attention / --backbone-seed"}


def train_digits(out_dir: str, *, steps: int, seed: int = 0, recipe: Optional[DigitsRecipe] = None,
                 batch_size: int = 32, lr: float = 1e-3, ema_decay: float = 0.999, checkpoint_every: int = 250,
                 resume: bool = False, eval_per_class: int = 50, eval_steps: int = 40, guidance: float = 5.0,
                 eval_at: Sequence[int] = (), progress: bool = True, command: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict:
    """Trains a digits model into ``out_dir``: periodic checkpoints (with EMA) under ``checkpoints/``,
    the per-step losses in ``losses.csv``, the exported EMA model in ``model/`` with ``MANIFEST.json``
    (command, commit, seed, steps, steps trained by this call, wall time, device, scores of
    ``eval_per_class`` samples per class; 0 skips all scoring). ``resume`` continues from the newest
    complete checkpoint (with the settings the run was started with, kept in ``run.json``).
    ``eval_at``: steps at which the EMA model is also scored (experiments); a score at the last step
    doubles as the final one. ``progress``: tqdm bars (training, scoring) when stderr is a terminal.
    Returns the manifest (with ``evals``, the scores at ``eval_at``)."""
    from latteflow.training.loop import checkpoint_steps, latest_checkpoint, train

    recipe = recipe or DigitsRecipe()
    for name, v, zero in (("steps", steps, False), ("batch_size", batch_size, False),
                          ("checkpoint_every", checkpoint_every, True), ("eval_per_class", eval_per_class, True),
                          ("eval_steps", eval_steps, False)):
        _positive(name, v, zero)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir):
        raise TypeError(f"out_dir must be a path, got {out_dir!r}")
    out_dir = os.path.abspath(os.fspath(out_dir))
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    settings = {"seed": seed, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
                "recipe": {"variant": recipe.variant, "num_groups": recipe.num_groups,
                           "residual_attention": recipe.residual_attention, "backbone_seed": recipe.backbone_seed}}
    if not resume and checkpoint_steps(ckpt_dir):
        raise ValueError(f"out {out_dir!r} already holds checkpoints: pass resume to continue, or choose a new folder")
    if resume:
        check_same_run(os.path.join(out_dir, RUN_NAME), {k: settings[k] for k in _RUN_KEYS}, flags=_RUN_KEYS)
    os.makedirs(os.path.join(ckpt_dir, EMA_DIR), exist_ok=True)
    clean_temporaries(out_dir)  # a killed export of model/, or of run.json / losses.csv
    clean_temporaries(os.path.join(out_dir, MODEL_DIR))
    start = latest_checkpoint(ckpt_dir) if resume else None
    step0 = 0 if start is None else int(os.path.basename(start).split("_")[1])
    if step0 > steps:
        raise ValueError(f"steps={steps} is below step {step0} of the checkpoint to resume ({start})")
    losses_path = os.path.join(out_dir, LOSSES_NAME)
    if start is None:
        if resume:
            log(f"nothing to resume in {ckpt_dir}: starting at step 0")
        atomic_write_bytes(os.path.join(out_dir, RUN_NAME), json.dumps(settings, indent=2).encode())
        atomic_write_bytes(losses_path, b"")
    else:
        _keep_losses(losses_path, step0)
        log(f"resuming from {start} (step {step0})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    commit = git_commit()  # before training: the code that trains, not what the tree holds at the end
    model, tok = build_digits_model(recipe, init_seed=seed, device=device)
    data = make_batches(model, tok, batch_size, seed)
    contexts = PromptContexts(model, tok)
    ema = EMA(model, ema_decay)
    eval_at = sorted({int(s) for s in eval_at})
    evals: List[dict] = []

    def scored(step: int) -> dict:
        backup = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ema.copy_to(model)
        try:
            r = evaluate_model(model, contexts, per_class=eval_per_class, steps=eval_steps,
                               guidance=guidance, seed=seed, progress=progress)
        finally:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in backup.items():
                    params[n].copy_(t)
            model.train()
        r["step"] = step
        return r

    def callback(step: int, loss: float) -> None:
        with open(losses_path, "a") as f:
            f.write(f"{step},{loss:.6f}\n")
        if step in eval_at and eval_per_class:
            r = scored(step)
            evals.append(r)
            log(f"step {step}: accuracy {r['accuracy']:.3f}  frechet {r['frechet_distance']:.2f}  "
                f"spread {r['spread_generated']:.3f} (real {r['spread_real']:.3f})")

    t_train = time.perf_counter()
    result = train(model, data, steps=steps, lr=lr, checkpoint_dir=ckpt_dir, checkpoint_every=checkpoint_every,
                   resume=start if start is not None else False, seed=seed, progress=progress, callback=callback,
                   ema=ema)
    train_seconds = time.perf_counter() - t_train
    ema.copy_to(model)
    model.eval()
    manifest = {
        "command": command,
        "commit": commit,
        "seed": seed,
        "steps": steps,
        "trained_steps": result.step - step0,
        "resumed_from_step": None if start is None else step0,
        "batch_size": batch_size,
        "lr": lr,
        "ema_decay": ema_decay,
        "recipe": {"variant": recipe.variant, "num_groups": recipe.num_groups,
                   "residual_attention": recipe.residual_attention, "backbone_seed": recipe.backbone_seed,
                   "backbone": DIGITS_BACKBONE},
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "device": device_description(device),
        "torch": torch.__version__,
        "train_seconds": round(train_seconds, 1),
        "final_loss": result.losses[-1] if result.losses else _final_loss(losses_path, result.step),
    }
    if evals and evals[-1]["step"] == steps:
        manifest["eval"] = {k: v for k, v in evals[-1].items() if k != "step"}
    elif eval_per_class:
        log(f"scoring {eval_per_class} samples per class ({eval_steps} steps, guidance {guidance}) ...")
        manifest["eval"] = evaluate_model(model, contexts, per_class=eval_per_class, steps=eval_steps,
                                          guidance=guidance, seed=seed, progress=progress)
    manifest["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    model_dir = save_digits_model(model, tok, os.path.join(out_dir, MODEL_DIR), recipe,
                                  metadata={"train_steps": steps, "seed": seed}, manifest=manifest)
    manifest["evals"] = evals
    manifest["model_dir"] = model_dir
    return manifest
