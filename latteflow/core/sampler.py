"""Euler sampling with classifier-free guidance, one CUDA graph per expert group (SPEC 3).

``sigma_i = 1 - i/T`` for ``i = 0..T``; step i evaluates the velocity at ``sigma_i`` with the group
owning ``s_i = 1000 (T - i) / T`` (computed exactly on the host, strict partition) and moves
``x += (sigma_{i+1} - sigma_i) v``. With a null context the conditional and null rows run as one
batch (their ``ctx_lens`` differ) and ``v = v_u + w (v_c - v_u)``.

On CUDA with ``cuda_graphs=True`` every group's step is captured once as a graph reading static
``x``, ``sigma``, guidance and context buffers (``StepGraphs``), and replayed for that group's steps;
the loop only fills ``sigma``, replays and adds ``dt * v`` to ``x``: no host sync, no allocation. The
graphs are kept on the model and reused by later ``sample`` calls of the same batch size and context
bucket (a new prompt batch is copied into the static context), so capture is paid once per shape,
not per call.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from latteflow.core.config import LatteFlowConfig
from latteflow.core.context import Context


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


CTX_BUCKET = 16  # context lengths are padded up to a multiple of this, so prompts of similar length share graphs


def _guided_velocity(model, k: int, x: Tensor, sigma: Tensor, ctx: Context, w) -> Tensor:
    """One step's velocity from group ``k``: CFG over a ``[cond; null]`` context when ``w`` is given."""
    if w is None:
        return model.group_velocity(k, x.to(model.dtype), sigma, ctx).float()
    v_c, v_u = model.group_velocity(k, torch.cat([x, x]).to(model.dtype), sigma, ctx).float().chunk(2)
    return v_u + w * (v_c - v_u)


class StepGraphs:
    """The per-group CUDA graphs of one sampling step for one shape (batch rows, context bucket, CFG or
    not), with the static buffers they read: ``x``, ``sigma``, the guidance weight and the context.

    ``load`` copies a new state and context into the buffers; ``velocity(k)`` captures group ``k`` on
    first use and replays it after. The weights are read in place, so optimizer steps and
    ``load_state_dict`` are seen by later replays; ``valid_for`` tells when the parameters moved to new
    storage (``model.to(...)``) and the graphs must be dropped.
    """

    def __init__(self, model, x: Tensor, ctx: Context, guided: bool):
        self.params = [p.data_ptr() for p in model.parameters()]
        self.x = torch.empty_like(x)
        self.sigma = torch.empty(ctx.batch_size, device=x.device, dtype=torch.float32)
        self.w = torch.empty((), device=x.device, dtype=torch.float32) if guided else None
        self.ctx = Context(tuple(t.clone() for t in ctx.keys), tuple(t.clone() for t in ctx.values), ctx.ctx_lens.clone())
        self.graphs: Dict[int, Tuple[object, Tensor]] = {}
        self.model = model

    def valid_for(self, model) -> bool:
        return [p.data_ptr() for p in model.parameters()] == self.params

    def load(self, x: Tensor, ctx: Context, w: float) -> None:
        self.x.copy_(x)
        for dst, src in zip(self.ctx.keys + self.ctx.values, ctx.keys + ctx.values):
            dst.copy_(src)
        self.ctx.ctx_lens.copy_(ctx.ctx_lens)
        if self.w is not None:
            self.w.fill_(w)

    def velocity(self, k: int) -> Tensor:
        if k not in self.graphs:
            self.graphs[k] = _capture(lambda: _guided_velocity(self.model, k, self.x, self.sigma, self.ctx, self.w))
        graph, v = self.graphs[k]
        graph.replay()
        return v


def _step_graphs(model, x: Tensor, ctx: Context, guided: bool) -> StepGraphs:
    """The model's cached ``StepGraphs`` for this shape, made (or remade, if the weights moved) on demand."""
    cache = model.__dict__.setdefault("_step_graphs", {})
    key = (tuple(x.shape), x.device, model.dtype, ctx.batch_size, ctx.max_len, guided)
    graphs = cache.get(key)
    if graphs is None or not graphs.valid_for(model):
        graphs = cache[key] = StepGraphs(model, x, ctx, guided)
    return graphs


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar of ``total`` units, shown when ``enabled`` and stderr is a terminal (tqdm decides)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None if enabled else True)


@torch.no_grad()
def sample(model, ctx: Context, null_ctx: Optional[Context] = None, *, steps: int = 40, guidance: float = 5.0,
           generator: Optional[torch.Generator] = None, cuda_graphs: bool = True, progress=False,
           noise: Optional[Tensor] = None) -> Tensor:
    """Samples latents ``(B, C, gh*p, gw*p)`` (float32) for the ``B`` rows of ``ctx``.

    ``null_ctx`` (1 or B rows) enables classifier-free guidance with weight ``guidance``; ``None``
    samples the conditional velocity alone. ``generator`` seeds the initial noise (the only random
    draw), ``noise`` replaces it. ``cuda_graphs`` is ignored off CUDA. ``progress``: True shows a tqdm
    bar of the steps (when stderr is a terminal, as tqdm decides); a bar (anything with ``update(n)``)
    is advanced by one per step instead, so a caller sampling in chunks can show one bar for all.
    """
    cfg = model.cfg
    if not isinstance(ctx, Context):
        raise TypeError(f"ctx must be a Context, got {type(ctx).__name__}")
    if null_ctx is not None and not isinstance(null_ctx, Context):
        raise TypeError(f"null_ctx must be a Context or None, got {type(null_ctx).__name__}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a number, got {guidance!r}")
    for c in (ctx, null_ctx):
        if c is not None:
            c.check_lens()  # once, here: the loop below never reads a device value on the host
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
    w = float(guidance) if guided else None

    if cuda_graphs and x.is_cuda:
        run_ctx = run_ctx.pad_to(-(-run_ctx.max_len // CTX_BUCKET) * CTX_BUCKET)
        graphs = _step_graphs(model, x, run_ctx, guided)
        graphs.load(x, run_ctx, w)
        x, sigma_buf = graphs.x, graphs.sigma
        step = graphs.velocity
    else:
        sigma_buf = torch.empty(run_ctx.batch_size, device=device, dtype=torch.float32)

        def step(k: int) -> Tensor:
            return _guided_velocity(model, k, x, sigma_buf, run_ctx, w)

    bar = progress if hasattr(progress, "update") else None
    if bar is None and progress:
        bar = progress_bar(len(schedule), "sampling")
    try:
        for sig, nxt, k in schedule:
            sigma_buf.fill_(sig)
            x.add_(step(k), alpha=nxt - sig)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None and bar is not progress:
            bar.close()
    return x.clone() if cuda_graphs and x.is_cuda else x
