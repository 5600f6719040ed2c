"""Building blocks of the generation path: the timestep embedding, the generation layer (a Qwen2
decoder layer whose attention is ``lk.latte_attention``) and the expert group (SPEC 3).

Nothing here re-implements an op: attention, 2D RoPE and the gated residual are one call to
``latte_kernels.latte_attention`` (backend ``"fused"``) or ``latte_kernels.reference.latte_attention``
(backend ``"reference"``). The Qwen2 norms and MLP are the backbone's own modules (copied).
"""
from __future__ import annotations

import copy
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import latte_kernels as lk
from latte_kernels import reference as lk_reference


def _fused_latte_attention(q, k, v, grid_hw, *, k_ctx, v_ctx, ctx_lens=None, q_prev=None, k_prev=None, gate=None,
                           rope_theta=10000.0):
    """``lk.latte_attention``'s registered op without the public argument checks: the layer builds
    every shape itself and the model checks ``ctx_lens`` once per call (``Context.check_lens``), so a
    sampling step reads no device value on the host (each check would be a sync on CUDA)."""
    return torch.ops.latte.latte_attention(q, k, v, list(grid_hw), k_ctx, v_ctx, ctx_lens, q_prev, k_prev, gate, None,
                                           rope_theta)


def attention_fn(backend: str):
    """The ``latte_attention`` implementation of a backend name."""
    if backend == "fused":
        return _fused_latte_attention
    if backend == "reference":
        return lk_reference.latte_attention
    raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(B, C, gh*p, gw*p) latent -> (B, gh*gw, C*p*p) tokens, row-major over the grid."""
    if patch_size > 1:
        x = F.pixel_unshuffle(x, patch_size)
    return x.flatten(2).transpose(1, 2)


def unpatchify(tokens: Tensor, grid_hw: Tuple[int, int], patch_size: int) -> Tensor:
    """Inverse of :func:`patchify`."""
    b, _, c = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, c, grid_hw[0], grid_hw[1])
    if patch_size > 1:
        x = F.pixel_shuffle(x, patch_size)
    return x


def sinusoidal_embedding(s: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) timesteps (0..1000) -> (B, dim) float32 ``[cos(s f_i), sin(s f_i)]``, ``f_i = max_period^(-i/half)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=s.device) / half)
    args = s.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """``h_t``: sinusoidal features of ``s = 1000 sigma`` -> Linear -> SiLU -> Linear (hidden)."""

    def __init__(self, timestep_dim: int, hidden_size: int):
        super().__init__()
        self.timestep_dim = timestep_dim
        self.linear_1 = nn.Linear(timestep_dim, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, s: Tensor) -> Tensor:
        emb = sinusoidal_embedding(s, self.timestep_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(emb)))


class GenerationLayer(nn.Module):
    """A Qwen2 decoder layer over image tokens: RMSNorm, attention (q/k/v with bias, o without) through
    ``latte_attention`` over [context; image] keys, residual, RMSNorm, SwiGLU MLP, residual.

    ``share_attention=True`` (blend) keeps the backbone layer's own ``self_attn`` module (its q/k/v/o
    train with it); otherwise (couple) the layer is a deep copy. Norms and MLP are always copies.
    ``gate=True`` adds ``W_t: hidden -> Hq`` (zero-initialised, no bias) whose output is the
    pre-activation of the residual-attention gate (the op applies tanh).
    """

    def __init__(self, decoder_layer: nn.Module, *, share_attention: bool, gate: bool, grid_hw: Tuple[int, int],
                 rope_theta: float, backend: str):
        super().__init__()
        attn = decoder_layer.self_attn
        self.self_attn = attn if share_attention else copy.deepcopy(attn)
        self.input_layernorm = copy.deepcopy(decoder_layer.input_layernorm)
        self.post_attention_layernorm = copy.deepcopy(decoder_layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(decoder_layer.mlp)
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.grid_hw = tuple(grid_hw)
        self.rope_theta = float(rope_theta)
        self.backend = backend
        self._attention = attention_fn(backend)
        hidden = attn.q_proj.in_features
        if gate:
            p = attn.q_proj.weight
            self.gate = nn.Linear(hidden, self.num_heads, bias=False, device=p.device, dtype=p.dtype)
            nn.init.zeros_(self.gate.weight)
        else:
            self.gate = None

    def forward(self, h: Tensor, h_t: Tensor, k_ctx: Tensor, v_ctx: Tensor, ctx_lens: Tensor,
                prev: Optional[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        """``h`` (B, N, hidden) image hidden states, ``h_t`` (B, hidden); ``prev`` the previous layer's raw
        (q, k) or None. Returns the new hidden states and this layer's raw (q, k) for the next layer."""
        b, n, _ = h.shape
        a = self.self_attn
        x = self.input_layernorm(h)
        q = a.q_proj(x).view(b, n, self.num_heads, self.head_dim)
        k = a.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        v = a.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim)
        residual = {}
        if self.gate is not None and prev is not None:
            residual = dict(q_prev=prev[0], k_prev=prev[1], gate=self.gate(h_t))
        # a context cached outside autocast meets bf16 projections inside it: one dtype per call
        k_ctx, v_ctx = k_ctx.to(q.dtype), v_ctx.to(q.dtype)
        out = self._attention(q, k, v, self.grid_hw, k_ctx=k_ctx, v_ctx=v_ctx, ctx_lens=ctx_lens,
                              rope_theta=self.rope_theta, **residual)
        h = h + a.o_proj(out.reshape(b, n, self.num_heads * self.head_dim))
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, (q, k)


class ExpertGroup(nn.Module):
    """One timestep expert: M consecutive generation layers with their own input projection and
    zero-initialised output head (RMSNorm + Linear). It reads the model's shared timestep embedding
    ``h_t`` as an input and depends on no other group's parameters. ``layer_offset`` is the index of
    its first layer in the backbone (and context)."""

    def __init__(self, decoder_layers: Sequence[nn.Module], *, layer_offset: int, token_dim: int, hidden_size: int,
                 rms_eps: float, share_attention: bool, residual_attention: bool,
                 grid_hw: Tuple[int, int], rope_theta: float, backend: str):
        super().__init__()
        self.layer_offset = layer_offset
        p = decoder_layers[0].self_attn.q_proj.weight
        dd = dict(device=p.device, dtype=p.dtype)
        self.input_proj = nn.Linear(token_dim, hidden_size, **dd)
        self.layers = nn.ModuleList(
            GenerationLayer(layer, share_attention=share_attention, gate=residual_attention and j > 0,
                            grid_hw=grid_hw, rope_theta=rope_theta, backend=backend)
            for j, layer in enumerate(decoder_layers)
        )
        self.norm_out = nn.RMSNorm(hidden_size, eps=rms_eps, **dd)
        self.proj_out = nn.Linear(hidden_size, token_dim, **dd)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, tokens: Tensor, h_t: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor],
                ctx_lens: Tensor) -> Tensor:
        """``tokens`` (B, N, C*p*p) noisy latent tokens, ``h_t`` (B, hidden) the timestep embedding;
        ``keys`` / ``values`` the whole model's per-layer context (this group reads its own layers)."""
        w = self.input_proj.weight
        h = self.input_proj(tokens.to(w.dtype)) + h_t[:, None, :]
        prev = None
        for j, layer in enumerate(self.layers):
            i = self.layer_offset + j
            h, prev = layer(h, h_t, keys[i], values[i], ctx_lens, prev)
        return self.proj_out(self.norm_out(h.to(self.norm_out.weight.dtype)))
