"""Euler sampling with classifier-free guidance, one CUDA graph per expert group (SPEC 3).

``sigma_i = 1 - i/T`` for ``i = 0..T``; step i evaluates the velocity at ``sigma_i`` with the group
owning ``s_i = 1000 (T - i) / T`` (computed exactly on the host, strict partition) and moves
``x += (sigma_{i+1} - sigma_i) v``. With a null context the conditional and null rows run as one
batch (their ``ctx_lens`` differ) and ``v = v_u + w (v_c - v_u)``.

On CUDA with ``cuda_graphs=True`` every group that the schedule uses is captured once, before the
loop, as a graph reading static ``x`` / ``sigma`` buffers and the (static) context; the loop then only
fills ``sigma``, replays and adds ``dt * v`` to ``x``: no host sync, no allocation.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .config import LatteFlowConfig
from .context import Context


def timestep_schedule(cfg: LatteFlowConfig, steps: int) -> List[Tuple[float, float, int]]:
    """``[(sigma_i, sigma_{i+1}, group_i) for i in range(steps)]``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return [((steps - i) / steps, (steps - i - 1) / steps, cfg.group_of(1000.0 * (steps - i) / steps))
            for i in range(steps)]


def group_step_counts(cfg: LatteFlowConfig, steps: int) -> List[int]:
    """How many of the ``steps`` Euler steps each group runs (12/10/10/8 for the defaults at T=40)."""
    counts = [0] * cfg.num_groups
    for _, _, k in timestep_schedule(cfg, steps):
        counts[k] += 1
    return counts


def _initial_noise(shape, generator: Optional[torch.Generator], device: torch.device) -> Tensor:
    """float32 Gaussian noise; drawn on the generator's device (so a CPU generator also seeds CUDA runs)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def _capture(fn: Callable[[], Tensor]) -> Tuple["torch.cuda.CUDAGraph", Tensor]:
    """Warms ``fn`` up on a side stream, then captures it; returns the graph and its static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@torch.no_grad()
def sample(model, ctx: Context, null_ctx: Optional[Context] = None, *, steps: int = 40, guidance: float = 5.0,
           generator: Optional[torch.Generator] = None, cuda_graphs: bool = True, progress: bool = False,
           noise: Optional[Tensor] = None) -> Tensor:
    """Samples latents ``(B, C, gh*p, gw*p)`` (float32) for the ``B`` rows of ``ctx``.

    ``null_ctx`` (1 or B rows) enables classifier-free guidance with weight ``guidance``; ``None``
    samples the conditional velocity alone. ``generator`` seeds the initial noise (the only random
    draw), ``noise`` replaces it. ``cuda_graphs`` is ignored off CUDA. ``progress`` shows tqdm.
    """
    cfg = model.cfg
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a Context, got {type(ctx).__name__}")
    if null_ctx is not None and not isinstance(null_ctx, Context):
        raise TypeError(f"null_ctx must be a Context or None, got {type(null_ctx).__name__}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a number, got {guidance!r}")
    schedule = timestep_schedule(cfg, steps)
    b, device = ctx.batch_size, ctx.device
    shape = (b, cfg.latent_channels, *cfg.latent_hw)
    if noise is None:
        x = _initial_noise(shape, generator, device)
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
        x = noise.to(device=device, dtype=torch.float32).clone()

    guided = null_ctx is not None
    run_ctx = Context.cat([ctx, null_ctx.to(device).expand_to(b)]) if guided else ctx
    rows = run_ctx.batch_size
    sigma_buf = torch.empty(rows, device=device, dtype=torch.float32)
    w = float(guidance)

    def step_fn(k: int) -> Callable[[], Tensor]:
        def fn() -> Tensor:
            x_in = torch.cat([x, x]) if guided else x
            v = model.group_velocity(k, x_in.to(model.dtype), sigma_buf, run_ctx).float()
            if not guided:
                return v
            v_c, v_u = v.chunk(2)
            return v_u + w * (v_c - v_u)
        return fn

    use_graphs = cuda_graphs and x.is_cuda
    graphs: Dict[int, Tuple[object, Tensor]] = {}
    if use_graphs:
        for sig, _, k in schedule:  # capture each used group once, at its first sigma, before the loop
            if k not in graphs:
                sigma_buf.fill_(sig)
                graphs[k] = _capture(step_fn(k))

    it = schedule
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(schedule, desc="sampling", leave=False)
    for sig, nxt, k in it:
        sigma_buf.fill_(sig)
        if use_graphs:
            graph, v = graphs[k]
            graph.replay()
        else:
            v = step_fn(k)()
        x.add_(v, alpha=nxt - sig)
    return x
