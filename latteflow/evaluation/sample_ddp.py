"""Distributed sampling for evaluation: ``torchrun --nproc_per_node N -m latteflow.evaluation.sample_ddp ...``.

Every rank samples its share (global indices ``rank, rank + W, rank + 2W, ...``) of ``[0, N)``.
Sample ``i`` asks for prompt ``prompts[i % P]`` and starts from Gaussian noise drawn from its own CPU
generator seeded with ``derive_seed(seed, i)``, and prompt contexts are built once per prompt
chunk and padded to one length, so the same images come out for any number of ranks and any per-rank
batch size. Each sample is written as ``<out>/images/<i:06d>.png``; after a barrier rank 0 reads the
PNGs back into an ADM-format ``.npz`` for the standard evaluator (``arr_0``: uint8 ``N x H x W x 3``,
grayscale replicated to 3 channels; ``arr_1``: the prompt index of each sample), a PNG grid of the first
samples and ``manifest.json`` (prompts, settings, timings).

``sample_to_dir(model, tokenizer, prompts, out_dir, ...)`` is the core and takes an already-built
model; ``main(argv)`` is the command line (``--checkpoint PATH|digits``). Also runs as a plain
``python -m latteflow.evaluation.sample_ddp`` (world size 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from latteflow.core.files import atomic_write
from latteflow.core.checkpoint import load_checkpoint, read_config
from latteflow.core.context import PromptContexts
from latteflow.distributed import DistEnv, MainParser, all_gather_objects, barrier, derive_seed, init_distributed, run_main
from latteflow.data.images import save_image_grid, to_uint8
from latteflow.core.sampler import sample

__all__ = ["PromptContexts", "SampleRun", "class_balanced", "initial_noise", "load_for_sampling", "main",
           "read_prompts", "sample_indices", "sample_to_dir", "shard_indices"]

IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.json"
GRID_NAME = "grid.png"
GRID_MAX = 100


# ------------------------------------------------------------------------------------------------
# which sample is what
def read_prompts(path: str) -> List[str]:
    """Prompts from a text file, one per non-empty line (surrounding whitespace stripped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompts file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path!r} holds no prompt")
    return prompts


def class_balanced(num_prompts: int, *, per_class: Optional[int] = None, num_samples: Optional[int] = None) -> int:
    """The number of samples: ``per_class * num_prompts``, or ``num_samples`` (exactly one of them).
    Sample ``i`` uses prompt ``i % num_prompts``, so any ``per_class`` gives every prompt equally often."""
    if (per_class is None) == (num_samples is None):
        raise ValueError("give exactly one of per_class and num_samples")
    name, value = ("per_class", per_class) if per_class is not None else ("num_samples", num_samples)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value * num_prompts if per_class is not None else value


def shard_indices(num_samples: int, rank: int, world_size: int) -> List[int]:
    """Rank ``rank``'s global indices: ``rank, rank + world_size, ...`` below ``num_samples``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    return list(range(rank, num_samples, world_size))


def initial_noise(indices: Sequence[int], shape: Tuple[int, ...], seed: int) -> Tensor:
    """float32 CPU noise ``(len(indices), *shape)``; row ``j`` depends only on ``(seed, indices[j])``."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(derive_seed(seed, int(i))))
            for i in indices]
    return torch.stack(rows)


def sample_indices(model, contexts: PromptContexts, indices: Sequence[int], *, seed: int = 0, steps: int = 40,
                   guidance: float = 5.0, batch_size: int = 16, cuda_graphs: bool = True) -> Tensor:
    """float32 CPU latents for the global ``indices`` (prompt ``i % P``), ``batch_size`` at a time."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    cfg = model.cfg
    shape = (cfg.latent_channels, *cfg.latent_hw)
    num_prompts = len(contexts.prompts)
    out = []
    for start in range(0, len(indices), batch_size):
        batch = list(indices[start:start + batch_size])
        ctx = contexts.rows([i % num_prompts for i in batch])
        noise = initial_noise(batch, shape, seed).to(model.device)
        x = sample(model, ctx, contexts.null, steps=steps, guidance=guidance, noise=noise, cuda_graphs=cuda_graphs)
        out.append(x.float().cpu())
    return torch.cat(out) if out else torch.empty(0, *shape)


# ------------------------------------------------------------------------------------------------
# writing
def _png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, IMAGES_DIR, f"{index:06d}.png")


def _write_png(u8: np.ndarray, path: str) -> None:
    from PIL import Image

    img = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8)
    with atomic_write(path) as f:
        img.save(f, format="PNG")


def _read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


@dataclass
class SampleRun:
    """What ``sample_to_dir`` did (the same on every rank; ``npz`` is None where none was written)."""

    num_samples: int
    world_size: int
    seconds: float
    seconds_per_image: float
    out_dir: str
    npz: Optional[str] = None
    grid: Optional[str] = None
    settings: Dict[str, object] = field(default_factory=dict)


def sample_to_dir(model, tokenizer, prompts: Sequence[str], out_dir: str, *, num_samples: Optional[int] = None,
                  per_class: Optional[int] = None, seed: int = 0, steps: int = 40, guidance: float = 5.0,
                  batch_size: int = 16, decode: Optional[Callable[[Tensor], Tensor]] = None,
                  cuda_graphs: bool = True, write_npz: bool = True, env: Optional[DistEnv] = None) -> SampleRun:
    """Samples ``num_samples`` (or ``per_class * len(prompts)``) images with this process's share of
    the work and writes them under ``out_dir`` (see the module docstring). Every rank of the current
    process group must call it with the same arguments; ``env`` defaults to ``init_distributed()``.

    ``decode(latents) -> float images (B, C, H, W) in [-1, 1]`` (default: the latents are the images,
    C in {1, 3}). ``batch_size`` is per rank and does not change the images."""
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a non-empty sequence of str")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n = class_balanced(len(prompts), per_class=per_class, num_samples=num_samples)
    env = init_distributed() if env is None else env
    decode = (lambda z: z) if decode is None else decode
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, IMAGES_DIR), exist_ok=True)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        mine = shard_indices(n, env.rank, env.world_size)
        contexts = PromptContexts(model, tokenizer, prompts)
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            z = sample_indices(model, contexts, batch, seed=seed, steps=steps, guidance=guidance,
                               batch_size=batch_size, cuda_graphs=cuda_graphs)
            with torch.no_grad():
                u8 = to_uint8(decode(z.to(model.device)).float().clamp(-1.0, 1.0).cpu())
            for i, img in zip(batch, u8):
                _write_png(img, _png_path(out_dir, i))
    finally:
        model.train(was_training)
    mine_s = time.perf_counter() - t0
    barrier(env)
    seconds = max(all_gather_objects(env, mine_s))
    settings = dict(prompts=prompts, seed=seed, steps=steps, guidance=guidance, batch_size_per_rank=batch_size,
                    world_size=env.world_size, prompt_of_index="index % len(prompts)")
    run = SampleRun(num_samples=n, world_size=env.world_size, seconds=seconds, seconds_per_image=seconds / n,
                    out_dir=out_dir, settings=settings)
    if env.is_main:
        images = np.stack([_read_rgb(_png_path(out_dir, i)) for i in range(n)])
        labels = np.arange(n, dtype=np.int64) % len(prompts)
        if write_npz:
            h, w = images.shape[1:3]
            run.npz = os.path.join(out_dir, f"samples_{n}x{h}x{w}x3.npz")
            with atomic_write(run.npz) as f:
                np.savez(f, arr_0=images, arr_1=labels)
        run.grid = str(save_image_grid(images[:GRID_MAX], os.path.join(out_dir, GRID_NAME), scale=1 if images.shape[1] >= 64 else 8))
        manifest = dict(asdict(run), settings=settings)
        with atomic_write(os.path.join(out_dir, MANIFEST_NAME), "w") as f:
            json.dump(manifest, f, indent=2)
    barrier(env)  # nobody leaves before the npz exists
    return run


# ------------------------------------------------------------------------------------------------
# loading
def _tokenizer_for(path: str, config: dict):
    from latteflow.text.tokenizer import TOKENIZER_FILENAME, CharTokenizer

    meta = config.get("metadata") or {}
    if isinstance(meta.get("tokenizer"), dict):
        return CharTokenizer.from_dict(meta["tokenizer"])
    if os.path.isfile(os.path.join(path, TOKENIZER_FILENAME)):
        return CharTokenizer.load(path)
    return CharTokenizer()


def _from_pipeline(spec: str, device: torch.device):
    try:
        from latteflow.pipeline import load_pipeline  # written beside this module; imported only when needed
    except ImportError as e:
        raise ValueError(f"--checkpoint {spec!r} needs latteflow.pipeline.load_pipeline, which this install "
                         f"lacks ({e}); pass a checkpoint directory that holds its backbone") from None
    pipe = load_pipeline(spec)
    model, tokenizer = getattr(pipe, "model", None), getattr(pipe, "tokenizer", None)
    if model is None or tokenizer is None:
        raise TypeError(f"load_pipeline({spec!r}) returned {type(pipe).__name__} without .model and .tokenizer")
    ae = getattr(pipe, "autoencoder", None) or getattr(pipe, "vae", None)
    return model.to(device), tokenizer, (ae.to(device).decode if ae is not None else None)


def load_for_sampling(checkpoint: str, device: torch.device, backend: Optional[str] = None):
    """``(model, tokenizer, decode)`` for ``checkpoint``: ``"digits"`` (the shipped model, through
    ``latteflow.pipeline.load_pipeline``) or a checkpoint directory. A directory that holds its
    backbone loads directly (tokenizer from its metadata, else the package's character tokenizer;
    latents are images); one without goes through ``load_pipeline`` when that module exists."""
    if not isinstance(checkpoint, str) or not checkpoint:
        raise ValueError(f"checkpoint must be 'digits' or a checkpoint directory, got {checkpoint!r}")
    overrides = {} if backend is None else {"backend": backend}
    if checkpoint == "digits":
        model, tok, decode = _from_pipeline(checkpoint, device)
    else:
        if not os.path.isdir(checkpoint):
            raise FileNotFoundError(f"checkpoint {checkpoint!r} is neither 'digits' nor a directory")
        config = read_config(checkpoint)
        pretrained = ((config.get("metadata") or {}).get("tokenizer") or {}).get("type") == "pretrained"
        if config.get("includes_backbone") and not pretrained:  # pretrained: backbone folder, tokenizer, VAE
            return load_checkpoint(checkpoint, device=device, **overrides), _tokenizer_for(checkpoint, config), None
        model, tok, decode = _from_pipeline(checkpoint, device)
    if backend is not None and model.cfg.backend != backend:
        raise ValueError(f"--backend {backend} cannot override the pipeline's model (backend {model.cfg.backend})")
    return model, tok, decode


# ------------------------------------------------------------------------------------------------
# command line
def build_parser(prog: str = "latteflow sample --distributed") -> argparse.ArgumentParser:
    p = MainParser(prog=prog, description="Sample a class-balanced (or prompt-file) set of images on every rank "
                                       "of a torchrun job; write one PNG per sample and an ADM .npz.")
    p.add_argument("--checkpoint", required=True, help="'digits' (the shipped model) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--per-class", type=int, help="samples per prompt (default 50 without --num-samples)")
    g.add_argument("--num-samples", type=int, help="total samples; sample i uses prompt i %% P")
    p.add_argument("--prompts", help="file with one prompt per line (default: the checkpoint's prompts)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=50, help="per rank; does not change the images")
    p.add_argument("--backend", choices=("fused", "reference"), help="override the checkpoint's backend")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: CUDA when available")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-npz", action="store_true", help="write the PNGs only")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point; returns the exit status (0 ok, 2 misuse / bad input)."""
    return run_main(build_parser(), argv, _sample_main)


def _sample_main(args, env: DistEnv) -> str:
    model, tokenizer, decode = load_for_sampling(args.checkpoint, env.device, args.backend)
    known = model.cfg.extra.get("prompts")
    prompts = read_prompts(args.prompts) if args.prompts else list(known or _default_prompts())
    outside = [p for p in prompts if known and p not in known]
    if outside:  # a class-conditional checkpoint was taught its prompt set only
        raise ValueError(f"--prompts: {outside[0]!r} is not among the {len(known)} prompts of this class-conditional "
                         f"checkpoint ({', '.join(map(repr, known[:10]))}{', ...' if len(known) > 10 else ''})")
    per_class = args.per_class if args.per_class is not None or args.num_samples is not None else 50
    run = sample_to_dir(model, tokenizer, prompts, args.out, num_samples=args.num_samples, per_class=per_class,
                        seed=args.seed, steps=args.steps, guidance=args.guidance, batch_size=args.batch_size,
                        decode=decode, cuda_graphs=not args.no_cuda_graphs, write_npz=not args.no_npz, env=env)
    return (f"sampled {run.num_samples} images on {run.world_size} rank(s) in {run.seconds:.2f} s "
            f"({run.seconds_per_image:.4f} s/img) -> {run.npz or run.out_dir}")


def _default_prompts() -> Sequence[str]:
    from latteflow.data.digits import DIGIT_PROMPTS

    return DIGIT_PROMPTS


if __name__ == "__main__":
    sys.exit(main())
