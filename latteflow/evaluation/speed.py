"""The s/img of LaTtE-Flow sampling: what ``latteflow bench`` measures and ``benchmarks.e2e`` compares.

One timed run is what a user pays for a batch: one backbone prefill over the conditional prompts and
the null prompt together (``build_context``; one call, so the backbone's weights stream once), then
``model.sample`` (T steps; for the graphs mode that includes the sampler's per-call graph capture).
s/img = run time / B. The latent decode (DC-AE f32c32, random weights) is timed apart.

The paper configuration (SPEC 5): a random-weight backbone with the text shapes of Qwen2-VL-2B
(nothing is downloaded), K = 4 expert groups of M = 7 layers, an 8 x 8 grid of 64 image tokens with 32
latent channels, class prompts of 11 tokens through the character tokenizer and the null prompt "",
T = 40 Euler steps, classifier-free guidance 5, batch 1 and 50, bfloat16; ``small`` is a tiny backbone,
a 4 x 4 grid, T = 4, batch 2, float32 (what a CPU-only machine runs).

Modes say how a model runs (``Mode``): its variant (the vanilla baseline runs all layers every step),
reference or fused ops, one CUDA graph per expert group, or ``torch.compile(mode="max-autotune")`` of
the per-group velocity (its compile time measured apart, kept out of s/img).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["BASELINE", "MODES", "MODE_NAMES", "Mode", "Setup", "build_backbone_for", "build_model", "class_prompts",
           "dc_ae_config", "generate", "make_setup", "profile_table", "select_modes", "time_decode", "time_mode",
           "time_runs"]

@dataclass(frozen=True)
class Mode:
    name: str
    variant: str
    backend: str
    cuda_graphs: bool = False
    compile: bool = False

    @property
    def needs_cuda(self) -> bool:
        return self.cuda_graphs or self.compile


MODES: Tuple[Mode, ...] = (
    Mode("vanilla_couple-eager-reference", "vanilla_couple", "reference"),
    Mode("latte-eager-reference", "couple", "reference"),
    Mode("latte-eager-fused", "couple", "fused"),
    Mode("latte-graphs-fused", "couple", "fused", cuda_graphs=True),
    Mode("latte-compile-reference", "couple", "reference", compile=True),
)
BASELINE = MODES[0].name
MODE_NAMES = tuple(m.name for m in MODES)


@dataclass(frozen=True)
class Setup:
    """What one benchmark run builds: the backbone, the groups, the data shapes."""

    small: bool
    device: torch.device
    dtype: torch.dtype
    num_groups: int
    grid_hw: Tuple[int, int]
    latent_channels: int
    steps: int
    guidance: float
    batches: Tuple[int, ...]
    repeats: int


def dc_ae_config(small: bool) -> Dict[str, object]:
    """An ``AutoencoderDC`` config: dc-ae-f32c32-in-1.0's architecture (32 latent channels, 32x spatial
    compression over six stages of widths 128..1024, ResBlocks then EfficientViT blocks, batch-norm/ReLU
    then RMSNorm/SiLU decoder stages), or, ``small``, the same structure at toy widths."""
    widths = (8, 8, 16, 16, 32, 32) if small else (128, 256, 512, 512, 1024, 1024)
    return dict(
        in_channels=3, latent_channels=32, attention_head_dim=8 if small else 32,
        encoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        decoder_block_types=["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
        encoder_block_out_channels=widths, decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 1, 1, 1, 1, 1) if small else (0, 4, 8, 2, 2, 2),
        decoder_layers_per_block=(0, 1, 1, 1, 1, 1) if small else (0, 5, 10, 2, 2, 2),
        encoder_qkv_multiscales=((),) * 6, decoder_qkv_multiscales=((),) * 6,
        decoder_norm_types=["batch_norm"] * 3 + ["rms_norm"] * 3, decoder_act_fns=["relu"] * 3 + ["silu"] * 3,
        scaling_factor=0.3189,
    )


def build_backbone_for(setup: Setup):
    """The seeded random-weight backbone of ``setup``: Qwen2-VL-2B text shapes, or the tiny one when small."""
    from latteflow.text.backbones import build_backbone, paper_qwen2vl_config, tiny_qwen2vl_config

    config = tiny_qwen2vl_config() if setup.small else paper_qwen2vl_config()
    return build_backbone(config, seed=0, dtype=setup.dtype, device=setup.device)


def build_model(backbone, setup: Setup, variant: str, backend: str, seed: int = 0):
    """A ``LatteFlowModel`` over ``backbone`` whose zero-initialised output heads and residual gates get
    small random values (so every path computes something non-trivial, as in a trained model)."""
    from latteflow.core.config import LatteFlowConfig
    from latteflow.core.model import LatteFlowModel

    cfg = LatteFlowConfig(variant=variant, num_groups=setup.num_groups, latent_channels=setup.latent_channels,
                          grid_hw=setup.grid_hw, backend=backend)
    model = LatteFlowModel(backbone, cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for group in model.groups:
            w = group.proj_out.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
            for layer in group.layers:
                if layer.gate is not None:
                    g = layer.gate.weight
                    g.copy_(torch.randn(g.shape, generator=gen) * 0.02)
    return model


def class_prompts(batch: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``batch`` class prompts ("class 000", ...; 11 tokens each) followed by the null prompt ("", 2 tokens),
    right-padded into one ``(batch + 1, 11)`` batch."""
    from latteflow.text.tokenizer import CharTokenizer

    return CharTokenizer().encode([f"class {i % 1000:03d}" for i in range(batch)] + [""], device=device)


def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int, guidance: float,
             cuda_graphs: bool) -> torch.Tensor:
    """What one timed run does: the prefill (conditional rows and the null row in one backbone call),
    then T guided Euler steps. Returns the latents."""
    from latteflow.core.context import Context

    batch = input_ids.shape[0] - 1
    with torch.no_grad():
        ctx_all: Context = model.build_context(input_ids, attention_mask)
        rows = torch.arange(batch + 1, device=input_ids.device)
        ctx, null_ctx = ctx_all.index_select(rows[:batch]), ctx_all.index_select(rows[batch:])
        generator = torch.Generator().manual_seed(0)
        return model.sample(ctx, null_ctx, steps=steps, guidance=guidance, generator=generator,
                            cuda_graphs=cuda_graphs)


# ----------------------------------------------------------------------------------------------------
# timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], object], device: torch.device, repeats: int) -> Dict[str, float]:
    """Wall-clock ms of ``repeats`` calls (device synchronised around each): p50, p20, p80."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    if len(times) == 1:
        return {"ms_p50": times[0], "ms_p20": times[0], "ms_p80": times[0]}
    q = statistics.quantiles(times, n=10, method="inclusive")
    return {"ms_p50": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def _compiled(model):
    """``model.group_velocity`` replaced (on this instance) by ``torch.compile(mode="max-autotune")`` of it;
    the sampler calls ``model.group_velocity``, so ``model.sample`` runs the compiled graphs."""
    torch._dynamo.reset()  # a fresh compile per batch shape, never a silent dynamic-shape recompile
    model.group_velocity = torch.compile(type(model).group_velocity.__get__(model), mode="max-autotune",
                                         dynamic=False)
    return model


def _uncompiled(model) -> None:
    model.__dict__.pop("group_velocity", None)
    torch._dynamo.reset()


def make_setup(args) -> Setup:
    """The configuration ``args`` (the bench flags: small, steps, guidance, batch, repeats) ask for on this
    machine: the paper configuration on CUDA, the small one with ``--small`` or without CUDA."""
    cuda = torch.cuda.is_available()
    small = args.small or not cuda
    return Setup(
        small=small,
        device=torch.device("cuda" if cuda else "cpu"),
        dtype=torch.float32 if small else torch.bfloat16,
        num_groups=4,
        grid_hw=(4, 4) if small else (8, 8),
        latent_channels=32,
        steps=args.steps or (4 if small else 40),
        guidance=args.guidance,
        batches=tuple(args.batch or ((2,) if small else (1, 50))),
        repeats=args.repeats or (3 if small else 5),
    )


def select_modes(args, setup: Setup) -> List[Mode]:
    """The modes ``args.modes`` / ``args.no_compile`` ask for that this setup can run; ValueError when none."""
    chosen = [m for m in MODES if args.modes is None or m.name in args.modes]
    out = []
    for m in chosen:
        if m.compile and args.no_compile:
            continue
        if m.needs_cuda and (setup.small or setup.device.type != "cuda"):
            if args.modes is not None:
                print(f"skipping {m.name}: CUDA graphs and torch.compile run only in the CUDA paper configuration")
            continue
        out.append(m)
    if not out:
        raise ValueError("--modes / --no-compile / --small leave no mode to run on this device")
    return out


def profile_table(fn: Callable[[], object], device: torch.device, title: str, path: Path) -> None:
    """Appends a torch.profiler table of the top 20 kernels of one call of ``fn`` to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with path.open("a") as f:
        f.write(f"=== {title} ===\n{prof.key_averages().table(sort_by=key, row_limit=20)}\n\n")


def time_mode(model, mode: Mode, input_ids: torch.Tensor, attention_mask: torch.Tensor, setup: Setup,
              after: Optional[Callable[[Callable[[], object]], object]] = None):
    """Times ``mode`` on ``model`` at one batch: one warm-up run (autotuning, cuBLAS heuristics, the
    compile), then ``setup.repeats`` timed runs. Returns ``(timing, compile_s, extra)``: the p50/p20/p80
    ms of a run, the compile time in seconds (None unless ``mode.compile``) and ``after(run)``, called
    while the mode is still in force (peak memory, a profile), or None without ``after``."""
    dev = setup.device

    def run():
        return generate(model, input_ids, attention_mask, setup.steps, setup.guidance, mode.cuda_graphs)

    if mode.compile:
        _compiled(model)
        _sync(dev)
    t0 = time.perf_counter()
    try:
        run()
        _sync(dev)
        first_s = time.perf_counter() - t0
        t = time_runs(run, dev, setup.repeats)
        extra = after(run) if after is not None else None
    finally:
        if mode.compile:
            _uncompiled(model)
    compile_s = max(first_s - t["ms_p50"] / 1e3, 0.0) if mode.compile else None
    return t, compile_s, extra


def time_decode(setup: Setup, batch: int, after: Optional[Callable[[Callable[[], object]], object]] = None):
    """Times the DC-AE decode of ``batch`` random latents: ``(name, latent shape, image shape, timing,
    after(decode))``; ImportError when diffusers is missing."""
    from latteflow.data.vae import DCAutoencoder

    vae = DCAutoencoder.from_config(dc_ae_config(setup.small)).to(device=setup.device, dtype=setup.dtype)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 32, *setup.grid_hw, generator=gen).to(setup.device, setup.dtype)
    with torch.no_grad():
        images = vae.decode(latents)  # warm-up (cuDNN algorithm choice)
        t = time_runs(lambda: vae.decode(latents), setup.device, setup.repeats)
        extra = after(lambda: vae.decode(latents)) if after is not None else None
    name = "dc-ae-f32c32" if not setup.small else "dc-ae-f32c32-toy"
    return name, tuple(latents.shape), tuple(images.shape), t, extra
