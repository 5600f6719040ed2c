"""Distributed training: ``torchrun --nproc_per_node N -m latteflow.training.ddp ...`` (SPEC 3 loss).

- **Data.** Step ``t``'s global batch is positions ``[t G, (t+1) G)`` of an endless stream of per-epoch
  permutations of the dataset (epoch ``e`` shuffled by ``derive_seed(data_seed, e)``); rank ``r`` takes
  the contiguous slice ``[r G/W, (r+1) G/W)``. The batch is a function of the step alone, so resuming
  needs no sampler state.
- **Randomness of the loss.** Sample ``j`` of step ``t``'s global batch draws its timesteps, noise and
  CFG dropout from its own generator seeded with ``derive_seed(seed, t, j)``
  (``LatteFlowModel.training_loss`` takes per-sample generators): 1 rank and W ranks see the same
  draws, and W-rank training equals 1-rank training on the same global batch up to float rounding.
- **Parallelism.** ``DistributedDataParallel`` over a module whose forward is the loss (so DDP's
  hooks see every step); the frozen couple backbone is inside it with no gradients, so DDP reduces
  only the trainable parameters. ``fsdp=True`` (blend variants, whose backbone trains) shards with
  FSDP2 ``fully_shard`` instead (units: see ``_apply_fsdp``).
- **Checkpoints.** Rank 0 writes the ``latteflow.core.checkpoint`` format atomically with the full,
  unsharded weights (FSDP2 gathers them through ``torch.distributed.checkpoint.state_dict``) and a
  ``trainer.pt`` holding the step, the optimizer state keyed by parameter names (full) and the seeds.
  Nothing in it depends on the world size, so a run resumes on any number of ranks.
- **EMA.** ``ema`` (a ``latteflow.training.loop.EMA``, DDP only) is updated on every rank after every
  optimizer step (the ranks hold the same weights); rank 0 writes it beside each checkpoint as the
  single-process trainer does (``ema/step_<k>.safetensors``, its digest in the config) and every rank
  restores it on resume. The command line exports it at the end as ``OUT/model`` (the EMA weights, the
  run's metadata), as ``latteflow train`` exports ``RUN/model``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from latteflow.core.checkpoint import atomic_write_bytes, load_state, load_trainer_state, save_checkpoint
from latteflow.core.context import Context, PromptContexts, text_model
from latteflow.distributed import DistEnv, MainParser, derive_seed, init_distributed, run_main
from latteflow.training.loop import (EMA, EMA_DIR, LATEST, _load_ema, check_trainer_args, clean_checkpoint_dir,
                                     latest_checkpoint)

__all__ = ["LabeledLatents", "TrainRun", "global_batch_indices", "main", "rank_slice", "train_distributed"]

TRAINER_FORMAT = "latteflow-ddp-1"
MODEL_DIR = "model"  # where the command line exports the final (EMA) weights, inside --out


# ------------------------------------------------------------------------------------------------
# data
def global_batch_indices(step: int, num_items: int, global_batch: int, data_seed: int) -> Tensor:
    """Dataset indices of step ``step``'s global batch (int64, ``global_batch`` long)."""
    if num_items < 1:
        raise ValueError(f"num_items must be positive, got {num_items}")
    first = step * global_batch
    out, epochs = [], {}
    for p in range(first, first + global_batch):
        e, o = divmod(p, num_items)
        if e not in epochs:
            epochs[e] = torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(data_seed, e)))
        out.append(int(epochs[e][o]))
    return torch.tensor(out, dtype=torch.long)


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of a global batch; ``world_size`` must divide ``global_batch``."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global_batch_size must be a positive int, got {global_batch!r}")
    if global_batch % world_size:
        raise ValueError(f"global_batch_size={global_batch} must be a multiple of the world size {world_size}")
    b = global_batch // world_size
    return slice(rank * b, (rank + 1) * b)


class LabeledLatents:
    """Latents ``(N, C, H, W)`` with a prompt index per row (``labels``, into ``prompts``).

    ``batch(model, indices)`` gives ``(x, ctx, null_ctx)``: contexts (built once, padded to one length)
    for a frozen backbone; for blend, whose backbone trains, the ``build_context`` arguments, turned into
    contexts inside the loss's forward so their gradients reach the backbone."""

    def __init__(self, latents: Tensor, labels: Tensor, prompts: Sequence[str], tokenizer):
        if not isinstance(latents, Tensor) or latents.dim() != 4:
            raise ValueError(f"latents must be a (N, C, H, W) tensor, got {getattr(latents, 'shape', latents)!r}")
        if not isinstance(labels, Tensor) or labels.shape != (latents.shape[0],):
            raise ValueError(f"labels must be a ({latents.shape[0]},) tensor, got {getattr(labels, 'shape', labels)!r}")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < len(prompts):
            raise ValueError(f"labels must index prompts (0..{len(prompts) - 1})")
        self.latents, self.labels, self.prompts, self.tokenizer = latents, labels.long(), list(prompts), tokenizer
        self._contexts = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def rows(self, indices: Tensor) -> Tensor:
        """The latents of ``indices`` (a dataset that reads them lazily overrides this)."""
        return self.latents[indices]

    def batch(self, model, indices: Tensor):
        x = self.rows(indices).to(model.device)
        labels = self.labels[indices].tolist()
        if model.cfg.is_blend:
            ids, mask = self.tokenizer.encode([self.prompts[i] for i in labels], device=model.device)
            null_ids, null_mask = self.tokenizer.encode([""], device=model.device)
            return x, {"input_ids": ids, "attention_mask": mask}, {"input_ids": null_ids, "attention_mask": null_mask}
        if self._contexts is None:
            self._contexts = PromptContexts(model, self.tokenizer, self.prompts)
        return x, self._contexts.rows(labels), self._contexts.null


class _Loss(nn.Module):
    """``forward`` = ``model.training_loss``, so DDP / FSDP2 hooks run on every step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, ctx, null_ctx, generators: List[torch.Generator]) -> Tensor:
        return self.model.training_loss(x, self._context(ctx), self._context(null_ctx), generator=generators)

    def _context(self, c) -> Optional[Context]:
        if c is None or isinstance(c, Context):
            return c
        return self.model.build_context(**c)


# ------------------------------------------------------------------------------------------------
# wrapping and state
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def fsdp_available() -> bool:
    return _fully_shard() is not None


def _apply_fsdp(loss: _Loss) -> None:
    """FSDP2 units: every q/k/v/o projection (blend shares them between the understanding and the
    generation path, so a unit must follow the module both call), every MLP (backbone and generation
    layers), each group's input projection and output head; the root holds the rest (norms, gates,
    embeddings, the timestep embedding). Units end at modules whose outputs are fresh tensors: a
    decoder layer hands views of q and k to the next one, which FSDP2's backward hooks do not survive."""
    fully_shard = _fully_shard()
    model = loss.model
    for layer in text_model(model.backbone).layers:
        a = layer.self_attn
        for proj in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
            fully_shard(proj)
        fully_shard(layer.mlp)
    for group in model.groups:
        for gl in group.layers:
            fully_shard(gl.mlp)
        fully_shard(group.input_proj)
        fully_shard(group.proj_out)
    fully_shard(loss)


def _state_options(env: DistEnv, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=env.distributed, strict=strict)


class _FullState:
    """What ``save_checkpoint`` reads from a model (``cfg``, ``backbone.config``, ``state_dict()``),
    holding an already gathered full state dict (FSDP2 keeps only shards on the real modules)."""

    def __init__(self, model, state: Dict[str, Tensor]):
        self.cfg, self.backbone = model.cfg, model.backbone
        keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        self._state = {n: t for n, t in state.items() if n in keep}  # shared tensors once, backbone names

    def state_dict(self, keep_vars: bool = False) -> Dict[str, Tensor]:
        return self._state


def _save(env: DistEnv, model, optimizer, step: int, trainer: Dict, path: str, *, sharded: bool,
          include_backbone: bool, metadata: Dict, ema: Optional[EMA] = None) -> None:
    """Collective: every rank calls it; rank 0 writes (the EMA first, so a complete step has its EMA)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _state_options(env)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
    full = get_model_state_dict(model, options=opts) if sharded else None
    if env.is_main:
        if ema is not None:
            name = os.path.basename(os.path.normpath(path))
            metadata = dict(metadata, ema=ema.save(os.path.join(os.path.dirname(path), EMA_DIR,
                                                                name + ".safetensors")))
        target = _FullState(model, full) if sharded else model
        save_checkpoint(target, path, trainer_state=dict(trainer, step=step, optimizer=optim_state),
                        include_backbone=include_backbone, metadata=metadata)


@dataclass
class TrainRun:
    """What ``train_distributed`` did (the same on every rank)."""

    step: int
    losses: List[float] = field(default_factory=list)
    checkpoint: Optional[str] = None
    world_size: int = 1
    ema: Optional[EMA] = None


def train_distributed(model, data: LabeledLatents, *, steps: int, global_batch_size: int, lr: float = 1e-4,
                      weight_decay: float = 0.0, betas=(0.9, 0.999), max_grad_norm: Optional[float] = 1.0,
                      amp: Optional[bool] = None, seed: int = 0, data_seed: int = 0, fsdp: bool = False,
                      checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0, keep_checkpoints: int = 2,
                      resume=True, include_backbone: bool = True, metadata: Optional[Dict] = None,
                      env: Optional[DistEnv] = None, callback=None,
                      micro_batch_size: Optional[int] = None, ema: Optional[EMA] = None) -> TrainRun:
    """Trains ``model`` (a ``LatteFlowModel`` on ``env.device``, identical on every rank) to ``steps``
    optimizer steps with AdamW on global batches of ``global_batch_size`` (see the module docstring).

    ``resume``: True continues from ``checkpoint_dir``'s latest checkpoint, a path from that checkpoint,
    False starts over. Checkpoints every ``checkpoint_every`` steps and at the end (rank 0 writes;
    ``include_backbone`` stores a couple model's frozen backbone too, so the directory alone rebuilds
    the model). ``callback(step, loss)`` runs on every rank after every step (loss: the global mean).
    ``micro_batch_size``: latents per forward on each rank (default: the rank's whole share); gradients
    accumulate over the micro-batches and DDP reduces once per step. Each sample keeps its generator, so
    the result does not depend on it beyond float rounding. ``ema``: an ``EMA`` of ``model`` (not with
    ``fsdp``), updated after every step, saved with every checkpoint, restored on resume; returned in
    ``TrainRun.ema``."""
    env = init_distributed() if env is None else env
    for name, v, lo in (("steps", steps, 0), ("checkpoint_every", checkpoint_every, 0), ("seed", seed, 0),
                        ("data_seed", data_seed, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    check_trainer_args(lr, max_grad_norm, checkpoint_every, checkpoint_dir)
    if fsdp and not model.cfg.is_blend:
        raise ValueError(f"fsdp shards the blend variants (whose backbone trains); variant {model.cfg.variant!r} "
                         "trains with DDP")
    if fsdp and not fsdp_available():
        raise ValueError("fsdp=True needs torch.distributed.fsdp.fully_shard (FSDP2), missing from this torch")
    local = rank_slice(global_batch_size, env.rank, env.world_size)
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int)
                                         or micro_batch_size < 1):
        raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
    micro = local.stop - local.start if micro_batch_size is None else micro_batch_size
    if len(data) < 1:
        raise ValueError("data must hold at least one sample")
    if ema is not None and not isinstance(ema, EMA):
        raise TypeError(f"ema must be a latteflow.training.loop.EMA or None, got {type(ema).__name__}")
    if ema is not None and fsdp:
        raise ValueError("ema: the distributed trainer keeps an EMA with DDP only, not with fsdp (sharded weights)")

    if checkpoint_dir is not None and env.is_main:
        clean_checkpoint_dir(checkpoint_dir)  # what a killed run left (temporaries only: no rank reads them)
    source = None
    if isinstance(resume, (str, os.PathLike)):
        source = os.fspath(resume)
    elif resume and checkpoint_dir is not None:
        source = latest_checkpoint(checkpoint_dir)
    trainer_saved, start = None, 0
    if source is not None:
        trainer_saved = load_trainer_state(source, map_location="cpu")
        if trainer_saved is None or trainer_saved.get("format") != TRAINER_FORMAT:
            raise ValueError(f"checkpoint {source!r} has no {TRAINER_FORMAT} trainer state to resume from")
        for name, value in (("global_batch_size", global_batch_size), ("seed", seed), ("data_seed", data_seed)):
            if trainer_saved[name] != value:
                raise ValueError(f"resuming {source!r} needs {name}={trainer_saved[name]} (as saved), got {value}")
        saved_decay = trainer_saved.get("ema_decay")
        if ema is not None and saved_decay is not None and saved_decay != ema.decay:
            raise ValueError(f"resuming {source!r} needs ema decay {saved_decay} (as saved), got {ema.decay}")
        load_state(model, source)  # full weights into every rank's unsharded model, before wrapping
        if ema is not None:
            _load_ema(ema, source)
        start = int(trainer_saved["step"])
    result = TrainRun(step=start, checkpoint=source, world_size=env.world_size, ema=ema)
    if start >= steps:
        return result

    device = env.device
    amp = device.type == "cuda" if amp is None else bool(amp)
    loss_module = _Loss(model)
    if fsdp and env.distributed:
        _apply_fsdp(loss_module)
        step_module = loss_module
    elif env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_module = DDP(loss_module, find_unused_parameters=model.cfg.is_blend)
    else:
        step_module = loss_module
    sharded = fsdp and env.distributed
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if trainer_saved is not None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        # strict=False: trainable parameters that never receive a gradient (blend's vision tower and
        # final norm, unused by the loss) have no AdamW state, in the saved run as in this one
        set_optimizer_state_dict(model, optimizer, optim_state_dict=trainer_saved["optimizer"],
                                 options=_state_options(env, strict=False))
    trainer = {"format": TRAINER_FORMAT, "global_batch_size": global_batch_size, "seed": seed,
               "data_seed": data_seed, "ema_decay": None if ema is None else ema.decay}
    metadata = dict(metadata or {})

    was_training = model.training
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else nullcontext()
    try:
        for step in range(start, steps):
            idx = global_batch_indices(step, len(data), global_batch_size, data_seed)[local]
            gens = [torch.Generator(device=device).manual_seed(derive_seed(seed, step, j))
                    for j in range(local.start, local.stop)]
            optimizer.zero_grad(set_to_none=True)
            starts = range(0, len(idx), micro)
            loss = 0.0
            for c, a in enumerate(starts):  # micro-batches: gradients accumulate, DDP reduces after the last
                part = slice(a, a + micro)
                x, ctx, null = data.batch(model, idx[part])
                weight = len(idx[part]) / len(idx)  # the loss is a mean over samples
                last = c == len(starts) - 1
                with (nullcontext() if last or not hasattr(step_module, "no_sync") else step_module.no_sync()):
                    with autocast:
                        part_loss = step_module(x, ctx, null, gens[part])
                    (part_loss * weight if weight != 1.0 else part_loss).backward()
                loss = loss + part_loss.detach() * weight
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            value = loss.detach().float().reshape(1)
            if env.distributed:
                dist.all_reduce(value)
                value /= env.world_size
            result.losses.append(float(value))
            result.step = step + 1
            if callback is not None:
                callback(step + 1, result.losses[-1])
            if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                name = f"step_{step + 1:08d}"
                path = os.path.join(checkpoint_dir, name)
                _save(env, model, optimizer, step + 1, trainer, path, sharded=sharded,
                      include_backbone=include_backbone, metadata=metadata, ema=ema)
                if env.is_main:
                    atomic_write_bytes(os.path.join(checkpoint_dir, LATEST), (name + "\n").encode())
                    _prune(checkpoint_dir, name, keep_checkpoints)
                    clean_checkpoint_dir(checkpoint_dir)  # the EMA files of the pruned steps
                result.checkpoint = path
                if env.distributed:
                    dist.barrier()
    finally:
        model.train(was_training)
    return result


def _prune(checkpoint_dir: str, newest: str, keep: int) -> None:
    if keep <= 0:
        return
    old = sorted(d for d in os.listdir(checkpoint_dir) if d.startswith("step_") and d != newest)
    for d in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(checkpoint_dir, d), ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# command line: the digits data on a seeded random Qwen2-VL-architecture backbone
def mrope_section_for(head_dim: int) -> List[int]:
    """An M-RoPE split of ``head_dim / 2`` in the 1 : 1.5 : 1.5 proportion of Qwen2-VL ([16, 24, 24] at 128)."""
    half = head_dim // 2
    s = round(3 * half / 8)
    if head_dim % 8 or half - 2 * s < 1:
        raise ValueError(f"head_dim must be a multiple of 8 (>= 8), got {head_dim}")
    return [half - 2 * s, s, s]


def build_digits_model(args, device: torch.device):
    from latteflow.text.backbones import build_backbone, tiny_qwen2vl_config
    from latteflow.core.config import LatteFlowConfig
    from latteflow.data.digits import DIGIT_PROMPTS, GRID_HW
    from latteflow.core.model import LatteFlowModel
    from latteflow.text.tokenizer import CharTokenizer

    if args.hidden % args.heads:
        raise ValueError(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
    tok = CharTokenizer()
    bcfg = tiny_qwen2vl_config(tok, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                               intermediate_size=args.mlp, mrope_section=mrope_section_for(args.hidden // args.heads))
    cfg = LatteFlowConfig(variant=args.variant, num_groups=args.num_groups, latent_channels=1, grid_hw=GRID_HW,
                          backend=args.backend, extra={"dataset": "digits", "prompts": list(DIGIT_PROMPTS)})
    backbone = build_backbone(bcfg, seed=args.backbone_seed, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.init_seed)
        model = LatteFlowModel(backbone, cfg)
    return model.to(device), tok


def build_parser(prog: str = "latteflow train --distributed") -> argparse.ArgumentParser:
    p = MainParser(prog=prog, description="Train a digits LaTtE-Flow model on every rank of a torchrun job "
                                       "(DDP, or FSDP2 for blend); checkpoints resume on any world size.")
    p.add_argument("--out", required=True, help="checkpoint directory (step_* subdirectories and 'latest')")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--data", default="digits", help="'digits' or a 'latteflow prepare' folder (needs --backbone)")
    p.add_argument("--backbone", default=None, help="Qwen2-VL folder (save_pretrained) for a prepare folder")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute the generation layers in backward")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="latents per forward on each rank (default: its whole share of the global batch)")
    p.add_argument("--global-batch-size", type=int, default=64, help="summed over ranks")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=None,
                   help="EMA decay of the weights exported as OUT/model (default 0.999; not with --fsdp)")
    p.add_argument("--no-ema", action="store_true", help="keep no EMA (OUT/model is not written)")
    p.add_argument("--recipe", choices=("imagenet256",), default=None,
                   help="a prepare folder: the paper's settings (latteflow.training.prepared.apply_recipe; "
                        "an explicit flag wins); printed")
    p.add_argument("--seed", type=int, default=0, help="loss randomness")
    p.add_argument("--data-seed", type=int, default=0, help="batch order")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=2, help="periodic checkpoints kept (0: all)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--variant", choices=("couple", "blend", "vanilla_couple", "vanilla_blend"), default="couple")
    p.add_argument("--num-groups", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=128)
    p.add_argument("--backbone-seed", type=int, default=0)
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--backend", choices=("fused", "reference"), default="fused")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 sharding (blend variants)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on for CUDA)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 misuse / bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = {x.split("=", 1)[0] for x in argv if x.startswith("--")}
    return run_main(build_parser(), argv, lambda args, env: _train_main(args, env, given))


# flag -> train_distributed setting, for --recipe (an explicit flag wins)
RECIPE_FLAGS = {"--steps": "steps", "--global-batch-size": "global_batch_size", "--lr": "lr", "--variant": "variant",
                "--num-groups": "num_groups", "--ema": "ema_decay", "--weight-decay": "weight_decay",
                "--max-grad-norm": "max_grad_norm"}
DEFAULT_EMA = 0.999


def _settings(args, env: DistEnv, given) -> Dict:
    """The optimisation settings of the command line, ``--recipe`` applied (and printed by rank 0)."""
    kw = dict(steps=args.steps, global_batch_size=args.global_batch_size, lr=args.lr, variant=args.variant,
              num_groups=args.num_groups, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
              betas=(0.9, 0.999), ema_decay=DEFAULT_EMA if args.ema is None else args.ema)
    if args.recipe is not None:
        from latteflow.training.prepared import apply_recipe

        if args.data == "digits":
            raise ValueError("--recipe goes with a prepare folder, not --data digits")
        kw, line = apply_recipe(args.recipe, kw, {k for f, k in RECIPE_FLAGS.items() if f in given})
        if env.is_main:
            print(line, flush=True)
    if args.no_ema:
        if args.ema is not None:
            raise ValueError("--ema and --no-ema exclude each other")
        kw["ema_decay"] = None
    elif args.fsdp and args.ema is None:
        kw["ema_decay"] = None  # FSDP2 shards the weights: no EMA unless asked for (which is refused)
    if kw["ema_decay"] is not None and not 0.0 <= kw["ema_decay"] < 1.0:
        raise ValueError(f"--ema must lie in [0, 1), got {kw['ema_decay']}")
    return kw


def _train_main(args, env: DistEnv, given=frozenset()) -> str:
    kw = _settings(args, env, given)
    args.variant, args.num_groups = kw.pop("variant"), kw.pop("num_groups")
    if args.data == "digits":
        from latteflow.data.digits import DIGIT_PROMPTS, load_digits_split

        if args.backbone is not None:
            raise ValueError("--backbone goes with a prepare folder, not --data digits")
        model, tok = build_digits_model(args, env.device)
        split = load_digits_split(0)
        data = LabeledLatents(split.train_images, split.train_labels, DIGIT_PROMPTS, tok)
        metadata, include_backbone = {"tokenizer": tok.to_dict(), "backbone_seed": args.backbone_seed}, True
    else:
        from latteflow.training.prepared import prepared_for_ddp

        model, data, metadata = prepared_for_ddp(args.data, args.backbone, env.device, variant=args.variant,
                                                 num_groups=args.num_groups, backend=args.backend,
                                                 init_seed=args.init_seed, grad_checkpoint=args.grad_checkpoint)
        include_backbone = model.cfg.is_blend  # couple: the trainable parameters, the backbone by SHA-256
    amp = None if args.amp == "auto" else args.amp == "on"

    def report(step, loss):
        if env.is_main and (step % 10 == 0 or step == args.steps):
            print(f"step {step}/{args.steps} loss {loss:.4f}", flush=True)

    decay = kw.pop("ema_decay")
    ema = None if decay is None else EMA(model, decay)
    kw["max_grad_norm"] = kw["max_grad_norm"] or None
    run = train_distributed(
        model, data, amp=amp, seed=args.seed, data_seed=args.data_seed, fsdp=args.fsdp, checkpoint_dir=args.out,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep, resume=not args.no_resume,
        include_backbone=include_backbone, metadata=metadata, env=env, callback=report,
        micro_batch_size=args.micro_batch_size, ema=ema, **kw)
    loss = f"final loss {run.losses[-1]:.4f}" if run.losses else "nothing to train"
    summary = f"trained to step {run.step} on {run.world_size} rank(s): {loss}; checkpoint {run.checkpoint}"
    if ema is not None and run.step > 0:
        if env.is_main:  # the EMA weights as the model, the way latteflow train exports RUN/model
            ema.copy_to(model)
            save_checkpoint(model, os.path.join(args.out, MODEL_DIR), include_backbone=include_backbone,
                            metadata=dict(metadata, steps=run.step))
        if env.distributed:
            dist.barrier()  # a job reading OUT/model next finds it complete on every rank
        summary += f"; EMA weights -> {os.path.join(args.out, MODEL_DIR)}"
    return summary


if __name__ == "__main__":
    sys.exit(main())
