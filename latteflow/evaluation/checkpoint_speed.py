"""``latteflow bench --checkpoint RUN [--batch N]``: seconds per image of a loaded pipeline (SPEC 3.2).

``time_pipeline(pipe, batch=N)`` times, after one untimed warm-up call (CUDA-graph capture, kernel
autotuning), ``repeats`` generations of ``N`` images: tokenising and the prompt prefill (the context
cache, conditional and null prompts) plus the ``steps`` Euler steps with classifier-free guidance, as
one number (``s_per_img``), and the autoencoder decode apart (``decode_s_per_img``). Medians over the
repeats; CUDA is synchronised around every timed region.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from latteflow.evaluation.speed import time_runs

__all__ = ["time_pipeline"]


def _positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


@torch.no_grad()
def time_pipeline(pipe, *, batch: int = 50, steps: int = 40, guidance: float = 5.0, repeats: int = 3, seed: int = 0,
                  prompts: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """``{"s_per_img", "decode_s_per_img", "batch", "steps", "repeats"}`` for ``pipe`` (a
    ``LatteFlowPipeline``); ``prompts``: the batch cycles through them (default: the checkpoint's prompt
    set, else the null prompt)."""
    from latteflow.core.sampler import sample

    _positive("batch", batch), _positive("steps", steps), _positive("repeats", repeats)
    pool = list(prompts) if prompts is not None else (pipe.prompts or [""])
    chosen = pipe.check_prompts([pool[i % len(pool)] for i in range(batch)])
    model, device, cfg = pipe.model, pipe.device, pipe.model.cfg
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((batch, cfg.latent_channels, *cfg.latent_hw), generator=g).to(device)

    def generate():
        ids, mask = pipe.tokenizer.encode(chosen, device=device)
        null_ids, null_mask = pipe.tokenizer.encode([""], device=device)
        ctx, null = model.build_context(ids, mask), model.build_context(null_ids, null_mask)
        return sample(model, ctx, null, steps=steps, guidance=float(guidance), noise=noise)

    latents = generate().float()  # warm-up, untimed
    pipe.autoencoder.decode(latents)
    gen_ms = time_runs(generate, device, repeats)["ms_p50"]
    dec_ms = time_runs(lambda: pipe.autoencoder.decode(latents), device, repeats)["ms_p50"]
    return {"s_per_img": gen_ms / 1e3 / batch, "decode_s_per_img": dec_ms / 1e3 / batch,
            "batch": batch, "steps": steps, "repeats": repeats}
