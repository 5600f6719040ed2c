"""Training on a ``latteflow prepare`` folder with a pretrained Qwen2-VL (SPEC 3.2): ``latteflow train --data
DIR --backbone DIR``.

- Model: the backbone from ``Qwen2VLForConditionalGeneration.from_pretrained`` (bfloat16 on CUDA, float32
  on CPU), latent channels and grid from the manifest, prompts through the backbone's own tokenizer
  (``latteflow.text.prompts``); the class prompts are the manifest's, recorded in the model config so the
  pipeline refuses any other.
- Loop: ``latteflow.training.loop.train`` (AdamW, bf16 autocast on CUDA, EMA, atomic checkpoints, exact
  resume) with ``global_batch_size / micro_batch_size`` micro-batches accumulated per step.
  ``grad_checkpoint`` recomputes each generation layer in the backward pass (activation checkpointing).
- Batches: micro-batch ``k`` is positions ``[k b, (k+1) b)`` of an endless stream of epochs, each epoch the
  order of a ``ShardAwareSampler`` seeded by ``data_seed`` (shards a window at a time, so the shard cache
  is hit): a function of ``k`` alone, so a resumed run sees the batches an uninterrupted one sees.
- Output folder: ``checkpoints/`` (``step_<k>`` + ``ema/``; each step records the metadata ``model/`` does,
  so ``load_pipeline`` opens it with its raw, non-EMA weights), ``run.json`` (settings a resume must keep,
  the backbone's digest among them) and ``model/``: the EMA weights as a checkpoint whose metadata records
  the backbone folder + SHA-256, the VAE folder + SHA-256 from the manifest, the latent space, the
  resolution and the classes. A Couple model stores its trainable parameters only; blend stores all.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from latteflow.core.checkpoint import atomic_write_bytes, save_checkpoint
from latteflow.core.config import LatteFlowConfig
from latteflow.core.model import LatteFlowModel

__all__ = ["IMAGENET256", "IMAGENET256_CHOSEN", "RECIPES", "PreparedLatents", "apply_recipe", "ShardBatches", "prepared_for_ddp", "build_prepared_model", "enable_grad_checkpointing",
           "model_metadata", "train_prepared"]

# The paper's ImageNet 256x256 settings (section 4, "training and evaluation details").
IMAGENET256 = dict(global_batch_size=2048, lr=5e-4, steps=240_000, variant="couple", num_groups=4)
# What the paper leaves open, and what --recipe imagenet256 chooses.
IMAGENET256_CHOSEN = dict(weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, ema=0.9999, warmup_steps=0)
RECIPES = {"imagenet256": (IMAGENET256, IMAGENET256_CHOSEN)}
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"
RUN_NAME = "run.json"


def apply_recipe(name: str, settings: Dict[str, Any], explicit=()):
    """``(settings, line)`` for ``--recipe name``, used by both trainers: ``settings`` (keys steps,
    global_batch_size, lr, variant, num_groups, ema_decay, weight_decay, betas, max_grad_norm) with the
    recipe's value wherever the key is not in ``explicit`` (what the command line gave: an explicit flag
    wins); ``line`` says what the recipe holds and what is in effect."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    paper, chosen = RECIPES[name]
    values = dict(paper, ema_decay=chosen["ema"], weight_decay=chosen["weight_decay"], betas=chosen["betas"],
                  max_grad_norm=chosen["max_grad_norm"])
    out = dict(settings)
    for key, value in values.items():
        if key not in explicit:
            out[key] = value
    line = (f"recipe {name} (paper): " + ", ".join(f"{k} {v}" for k, v in paper.items())
            + f"; chosen where the paper is silent: AdamW betas {chosen['betas']}, weight decay "
            f"{chosen['weight_decay']:g}, grad clip {chosen['max_grad_norm']}, EMA {chosen['ema']}, "
            f"{'no' if not chosen['warmup_steps'] else chosen['warmup_steps']} warmup, bf16 autocast on CUDA; "
            "in effect: " + ", ".join(f"{k} {out[k]}" for k in values if k in out))
    return out, line


def model_config(manifest: Dict[str, Any], *, variant: str = "couple", num_groups: int = 4,
                 residual_attention: bool = True, backend: str = "fused") -> LatteFlowConfig:
    """The LatteFlowConfig a prepare folder's latents need (channels and grid from ``latent_shape``)."""
    c, h, w = manifest["latent_shape"]
    return LatteFlowConfig(variant=variant, num_groups=num_groups, residual_attention=residual_attention,
                           latent_channels=int(c), grid_hw=(int(h), int(w)), patch_size=1, backend=backend,
                           extra={"dataset": "prepared", "prompts": list(manifest["prompts"]),
                                  "classes": list(manifest["classes"])})


def model_metadata(manifest: Dict[str, Any], backbone: Dict[str, str]) -> Dict[str, Any]:
    """What a checkpoint of this model records besides its weights (``load_pipeline`` reads it)."""
    return {"backbone": dict(backbone), "vae": dict(manifest["vae"]), "tokenizer": {"type": "pretrained"},
            "autoencoder": {"type": "dc-ae", "scaling_factor": float(manifest["scaling_factor"]),
                            "latent_shape": list(manifest["latent_shape"]), "resolution": int(manifest["resolution"])},
            "resolution": int(manifest["resolution"]), "classes": list(manifest["classes"])}


def build_prepared_model(manifest: Dict[str, Any], backbone_dir: str, *, device=None, init_seed: int = 0,
                         sha256: Optional[str] = None, **config_kw):
    """``(model, tokenizer, backbone_record)`` for training on a prepare folder's manifest with the backbone
    in ``backbone_dir``: the new heads are drawn from ``init_seed``; the trainable parameters are float32
    (blend: the whole model), the frozen couple backbone bfloat16 on CUDA."""
    from latteflow.text.pretrained import backbone_record, load_pretrained_backbone
    from latteflow.text.prompts import ChatPromptTokenizer

    record = backbone_record(backbone_dir)
    if sha256 is not None and record["sha256"] != sha256:
        raise ValueError(f"backbone folder {record['folder']!r}: weights SHA-256 {record['sha256'][:16]}... differ "
                         f"from the {sha256[:16]}... this run was started with")
    cfg = model_config(manifest, **config_kw)
    # what trains keeps float32 master weights (bf16 comes from autocast); a frozen couple backbone stays
    # in the loading dtype (bfloat16 on CUDA)
    backbone = load_pretrained_backbone(record["folder"], device=device,
                                        dtype=torch.float32 if cfg.is_blend else None)
    tokenizer = ChatPromptTokenizer.from_pretrained(record["folder"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = LatteFlowModel(backbone, cfg)
    for group in model.groups:
        group.float()
    model.time_embed.float()
    return model, tokenizer, record


def enable_grad_checkpointing(model: LatteFlowModel) -> int:
    """Recomputes every generation layer's activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant); same numbers, less memory. Returns the layers wrapped."""
    from torch.utils.checkpoint import checkpoint

    n = 0
    for group in model.groups:
        for layer in group.layers:
            inner = layer.forward

            def forward(*args, _inner=inner):
                if torch.is_grad_enabled():
                    return checkpoint(_inner, *args, use_reentrant=False)
                return _inner(*args)

            layer.forward = forward
            n += 1
    return n


class ShardBatches:
    """``k -> (x, ctx, null_ctx)``: micro-batch ``k`` of ``batch_size`` latents (see the module docstring).
    Contexts of the class prompts are built once (couple); blend gets ``build_context`` arguments."""

    def __init__(self, data, model: LatteFlowModel, tokenizer, batch_size: int, data_seed: int = 0):
        from latteflow.data.shards import ShardAwareSampler

        if len(data) < 1:
            raise ValueError("the prepare folder holds no latents")
        self.data, self.model, self.tokenizer, self.batch_size = data, model, tokenizer, batch_size
        self.sampler = ShardAwareSampler(data, num_replicas=1, rank=0, seed=data_seed)
        self._epoch, self._order, self._contexts = None, None, None

    def _order_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, torch.tensor(list(self.sampler), dtype=torch.long)
        return self._order

    def __call__(self, k: int):
        n = len(self.sampler)
        idx = []
        for p in range(k * self.batch_size, (k + 1) * self.batch_size):
            e, o = divmod(p, n)
            idx.append(int(self._order_of(e)[o]))
        items = [self.data[i] for i in idx]
        x = torch.stack([t for t, _ in items])
        labels = [lab for _, lab in items]
        prompts = self.data.prompts
        if self.model.cfg.is_blend:
            ids, mask = self.tokenizer.encode([prompts[i] for i in labels])
            null_ids, null_mask = self.tokenizer.encode([""])
            return x, {"input_ids": ids, "attention_mask": mask}, {"input_ids": null_ids, "attention_mask": null_mask}
        if self._contexts is None:
            from latteflow.core.context import PromptContexts

            self._contexts = PromptContexts(self.model, self.tokenizer, prompts)
        return x, self._contexts.rows(labels), self._contexts.null


def prepared_for_ddp(data_dir: str, backbone_dir: Optional[str], device, *, init_seed: int = 0,
                     grad_checkpoint: bool = False, **config_kw):
    """``(model, data, metadata)`` for ``latteflow.training.ddp.train_distributed`` on a prepare folder:
    ``data`` reads the shards lazily (``LabeledLatents`` interface), ``metadata`` is what the checkpoints
    record so ``load_pipeline`` and distributed sampling read them."""
    from latteflow.data.shards import LatentShards

    if backbone_dir is None:
        raise ValueError(f"--data {data_dir!r} is a prepare folder: --backbone DIR (a Qwen2-VL folder) is required")
    shards = LatentShards(data_dir)
    model, tokenizer, record = build_prepared_model(shards.manifest, backbone_dir, device=device,
                                                    init_seed=init_seed, **config_kw)
    if grad_checkpoint:
        enable_grad_checkpointing(model)
    return model, PreparedLatents(shards, tokenizer), model_metadata(shards.manifest, record)


class PreparedLatents:
    """The ``LabeledLatents`` interface (``len``, ``batch(model, indices)``) over a ``LatentShards``
    without loading it whole."""

    def __init__(self, shards, tokenizer):
        from latteflow.training.ddp import LabeledLatents

        labels = shards.labels()  # the label tensors only: no latent is loaded
        self._inner = LabeledLatents(torch.empty(len(shards), 0, 0, 0), labels, shards.prompts, tokenizer)
        self._inner.rows = lambda idx: torch.stack([shards[int(i)][0] for i in idx])
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def batch(self, model, indices):
        return self._inner.batch(model, indices)


def train_prepared(data_dir: str, backbone_dir: str, out_dir: str, *, steps: int, global_batch_size: int = 32,
                   micro_batch_size: Optional[int] = None, lr: float = 1e-4, weight_decay: float = 0.0,
                   betas=(0.9, 0.999), max_grad_norm: Optional[float] = 1.0, ema_decay: float = 0.999,
                   checkpoint_every: int = 250, resume: bool = False, grad_checkpoint: bool = False, seed: int = 0,
                   variant: str = "couple", num_groups: int = 4, residual_attention: bool = True,
                   backend: str = "fused", device=None, progress: bool = True,
                   log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Trains on the prepare folder ``data_dir`` into ``out_dir`` (see the module docstring); returns a
    summary (steps, trained_steps, final_loss, seconds, model_dir, device)."""
    from latteflow.data.shards import LatentShards
    from latteflow.training.loop import EMA, check_same_run, latest_checkpoint, train

    for name, v, lo in (("steps", steps, 1), ("global_batch_size", global_batch_size, 1),
                        ("checkpoint_every", checkpoint_every, 0), ("seed", seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    micro = global_batch_size if micro_batch_size is None else micro_batch_size
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 or global_batch_size % micro:
        raise ValueError(f"micro_batch_size must be a positive divisor of global_batch_size={global_batch_size}, "
                         f"got {micro_batch_size!r}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must lie in [0, 1), got {ema_decay!r}")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device is None else device)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    data = LatentShards(data_dir)
    run_path = os.path.join(out_dir, RUN_NAME)
    settings = {"data": data.folder, "global_batch_size": global_batch_size, "micro_batch_size": micro,
                "lr": lr, "seed": seed, "ema_decay": ema_decay, "variant": variant, "num_groups": num_groups,
                "residual_attention": residual_attention}
    saved_sha = None
    if resume and os.path.isfile(run_path):
        check_same_run(run_path, settings)
        with open(run_path) as f:
            saved_sha = (json.load(f).get("backbone") or {}).get("sha256")
    model, tokenizer, record = build_prepared_model(
        data.manifest, backbone_dir, device=device, init_seed=seed, sha256=saved_sha, variant=variant,
        num_groups=num_groups, residual_attention=residual_attention, backend=backend)
    atomic_write_bytes(run_path, (json.dumps(dict(settings, backbone=record), indent=2) + "\n").encode())
    if grad_checkpoint:
        enable_grad_checkpointing(model)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    if not resume and latest_checkpoint(ckpt_dir) is not None:
        raise ValueError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue, or choose another --out")
    ema = EMA(model, ema_decay)
    batches = ShardBatches(data, model, tokenizer, micro, data_seed=seed)
    metadata = model_metadata(data.manifest, record)
    trainable = sum(p.numel() for p in model.trainable_parameters())
    log(f"training {variant} ({num_groups} groups, {trainable / 1e6:.2f} M trainable parameters) on {len(data)} "
        f"latents of {len(data.classes)} classes; global batch {global_batch_size} = "
        f"{global_batch_size // micro} x {micro}; {device}")
    t0 = time.perf_counter()
    result = train(model, batches, steps=steps, lr=lr, weight_decay=weight_decay, betas=betas,
                   max_grad_norm=max_grad_norm, checkpoint_dir=ckpt_dir, checkpoint_every=checkpoint_every or steps,
                   resume=bool(resume), seed=seed, progress=progress, ema=ema,
                   accumulation=global_batch_size // micro, metadata=metadata)
    seconds = time.perf_counter() - t0
    ema.copy_to(model)
    model_dir = save_checkpoint(model, os.path.join(out_dir, MODEL_DIR),
                                metadata=dict(metadata, steps=result.step))
    return {"steps": result.step, "trained_steps": len(result.losses),
            "final_loss": result.losses[-1] if result.losses else None, "train_seconds": seconds,
            "model_dir": model_dir, "device": str(device)}
