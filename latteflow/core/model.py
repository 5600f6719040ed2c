"""``LatteFlowModel``: K timestep-expert groups of generation layers over a Qwen2-VL backbone (SPEC 3).

- ``couple`` / ``vanilla_couple``: the backbone is frozen (``requires_grad=False``, kept in eval mode
  even under ``model.train()``); every decoder layer gets a trainable deep copy for image tokens.
- ``blend`` / ``vanilla_blend``: each generation layer shares its backbone layer's q/k/v/o and keeps
  its own norms and MLP; every parameter (backbone included) trains, so contexts for training must be
  built with gradients enabled (``build_context`` does so whenever autograd is on).

Group k owns layers ``[k*M, (k+1)*M)`` and timesteps ``(b[k+1], b[k]]``; it has its own input
projection, timestep MLP (``h_t``, shared by the group's tokens and gates) and output head, so its
output depends on no other group's parameters.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latteflow.core.config import LatteFlowConfig
from latteflow.core.context import Context, build_context, text_model
from latteflow.core.layers import ExpertGroup, TimestepEmbedding, patchify, unpatchify


class _SampleDraws:
    """The random draws of ``training_loss``: from one generator (or the global RNG) for the whole
    batch, or from one generator per sample (each sample's values stacked in batch order)."""

    def __init__(self, generator, batch_size: int):
        if generator is None or isinstance(generator, torch.Generator):
            self.per_sample = None
            self.generator = generator
            return
        gens = list(generator)
        if len(gens) != batch_size or not all(isinstance(g, torch.Generator) for g in gens):
            raise TypeError(f"generator must be a torch.Generator, None or a sequence of {batch_size} generators "
                            f"(one per sample), got {type(generator).__name__} of length {len(gens)}")
        self.per_sample = gens

    def rand(self, b: int, device) -> Tensor:
        if self.per_sample is None:
            return torch.rand(b, device=device, generator=self.generator)
        return torch.cat([torch.rand(1, device=device, generator=g) for g in self.per_sample])

    def randn(self, shape, device) -> Tensor:
        if self.per_sample is None:
            return torch.randn(shape, device=device, generator=self.generator)
        return torch.cat([torch.randn((1, *shape[1:]), device=device, generator=g) for g in self.per_sample])


def _text_config(backbone):
    cfg = backbone.config
    return getattr(cfg, "text_config", None) or cfg


class LatteFlowModel(nn.Module):
    """The LaTtE-Flow generator. ``backbone``: a transformers ``Qwen2VLForConditionalGeneration``."""

    def __init__(self, backbone: nn.Module, cfg: LatteFlowConfig):
        super().__init__()
        if not isinstance(cfg, LatteFlowConfig):
            raise TypeError(f"cfg must be a LatteFlowConfig, got {type(cfg).__name__}")
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be a Qwen2VLForConditionalGeneration, got {type(backbone).__name__}")
        layers = text_model(backbone).layers
        num_layers = len(layers)
        if cfg.num_layers is not None and cfg.num_layers != num_layers:
            raise ValueError(f"num_layers={cfg.num_layers} but the backbone has {num_layers} decoder layers")
        per_group = cfg.check_num_layers(num_layers)
        tcfg = _text_config(backbone)
        head_dim = layers[0].self_attn.head_dim
        if head_dim % 8:
            raise ValueError(f"backbone head_dim must be a multiple of 8 for 2D RoPE and the kernels, got {head_dim}")
        self.cfg = cfg
        self.num_layers = num_layers
        self.layers_per_group = per_group
        self.hidden_size = tcfg.hidden_size
        self.backbone = backbone
        p = layers[0].self_attn.q_proj.weight
        # one timestep embedding for all groups (SPEC 3): it belongs to no group, so a group's output
        # still depends on no other group's parameters
        self.time_embed = TimestepEmbedding(cfg.timestep_dim, tcfg.hidden_size).to(device=p.device, dtype=p.dtype)
        self.groups = nn.ModuleList(
            ExpertGroup(
                layers[k * per_group:(k + 1) * per_group], layer_offset=k * per_group, token_dim=cfg.token_dim,
                hidden_size=tcfg.hidden_size, rms_eps=tcfg.rms_norm_eps,
                share_attention=cfg.is_blend, residual_attention=cfg.residual_attention,
                grid_hw=cfg.grid_hw, rope_theta=cfg.rope_theta, backend=cfg.backend,
            )
            for k in range(cfg.num_groups)
        )
        if cfg.is_blend:
            self.backbone.requires_grad_(True)
        else:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        for group in self.groups:  # after freezing: in blend, shared q/k/v/o belong to the groups too
            group.requires_grad_(True)
        self.time_embed.requires_grad_(True)

    # ----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "LatteFlowModel":
        super().train(mode)
        if not self.cfg.is_blend:
            self.backbone.eval()  # the frozen VLM never switches to training behaviour
        return self

    def trainable_parameters(self):
        """The parameters the optimizer should see (each once)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.groups[0].proj_out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.groups[0].proj_out.weight.dtype

    # ----------------------------------------------------------------------------------------------
    def build_context(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                      pixel_values: Optional[Tensor] = None, image_grid_thw: Optional[Tensor] = None) -> Context:
        """The prompt's per-layer K/V cache (one backbone forward; see ``latteflow.core.context``). For the
        frozen (couple) backbone it runs without autograd; for blend it records gradients when
        autograd is enabled."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.is_blend):
            return build_context(self.backbone, input_ids, attention_mask, pixel_values, image_grid_thw)

    # ----------------------------------------------------------------------------------------------
    def _check_inputs(self, x: Tensor, ctx: Context, name: str = "x") -> None:
        c, (h, w) = self.cfg.latent_channels, self.cfg.latent_hw
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor (B, {c}, {h}, {w}), got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise ValueError(f"{name} must have shape (B, {c}, {h}, {w}), got {tuple(x.shape)}")
        if not isinstance(ctx, Context):
            raise TypeError(f"ctx must be a Context (from build_context), got {type(ctx).__name__}")
        if ctx.num_layers != self.num_layers:
            raise ValueError(f"ctx has {ctx.num_layers} layers, the backbone {self.num_layers}")
        if ctx.batch_size not in (1, x.shape[0]):
            raise ValueError(f"ctx has {ctx.batch_size} rows, {name} has {x.shape[0]} (need equal, or 1 to broadcast)")
        if ctx.device != x.device:
            raise ValueError(f"ctx is on {ctx.device}, {name} on {x.device}")
        ctx.check_lens()

    def group_velocity(self, k: int, x: Tensor, sigma: Tensor, ctx: Context) -> Tensor:
        """Velocity from group ``k`` alone, whatever the timesteps (no checks, no host sync: the
        sampler's CUDA graphs capture this). ``sigma`` (B,), ``ctx`` with B rows."""
        cfg = self.cfg
        tokens = patchify(x, cfg.patch_size)
        h_t = self.time_embed(sigma * 1000.0)
        out = self.groups[k](tokens, h_t, ctx.keys, ctx.values, ctx.ctx_lens)
        return unpatchify(out, cfg.grid_hw, cfg.patch_size).to(x.dtype)

    def velocity(self, x: Tensor, sigma, ctx: Context) -> Tensor:
        """The velocity at ``x`` (B, C, gh*p, gw*p) and ``sigma`` (B,) (or a number) in [0, 1], from the
        group owning ``s = 1000 sigma`` (strict partition). A batch whose rows fall in different groups
        is split by group and each part runs its own group (reads ``sigma`` on the host)."""
        self._check_inputs(x, ctx)
        b = x.shape[0]
        if not isinstance(sigma, Tensor):
            sigma = torch.tensor(float(sigma), device=x.device)
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(b)
        if sigma.shape != (b,):
            raise ValueError(f"sigma must have shape ({b},) or be a scalar, got {tuple(sigma.shape)}")
        s_host = (sigma.double() * 1000.0).tolist()
        if any(not 0.0 <= v <= 1000.0 for v in (round(s, 3) for s in s_host)):
            raise ValueError(f"sigma must lie in [0, 1], got min {min(s_host) / 1000} max {max(s_host) / 1000}")
        ctx = ctx.expand_to(b)
        owners = [self.cfg.group_of(s) for s in s_host]
        if len(set(owners)) == 1:
            return self.group_velocity(owners[0], x, sigma, ctx)
        out = torch.empty_like(x)
        owners_t = torch.tensor(owners, device=x.device)
        for k in sorted(set(owners)):
            idx = (owners_t == k).nonzero().flatten()
            out[idx] = self.group_velocity(k, x[idx], sigma[idx], ctx.index_select(idx))
        return out

    def training_loss(self, x_data: Tensor, ctx: Context, null_ctx: Optional[Context] = None,
                      generator: Union[torch.Generator, Sequence[torch.Generator], None] = None) -> Tensor:
        """Layerwise flow matching (SPEC 3): for every sample and every group, ``s`` uniform in the group's
        widened interval, ``x_s = sigma noise + (1 - sigma) x_data``, MSE of the group's velocity against
        ``noise - x_data``; the mean over groups. With probability ``cfg.cfg_dropout`` per sample (drawn
        once, shared by all groups) the condition is replaced by ``null_ctx`` (1 or B rows).
        ``generator`` (on ``x_data``'s device) makes the draws reproducible; a sequence of B generators
        gives sample b its draws from generator b alone, so they do not depend on the batch the sample
        sits in (distributed training splits a global batch over ranks this way)."""
        self._check_inputs(x_data, ctx, "x_data")
        b, dev = x_data.shape[0], x_data.device
        generator = _SampleDraws(generator, b)
        ctx = ctx.expand_to(b)
        if null_ctx is not None and self.cfg.cfg_dropout > 0:
            if not isinstance(null_ctx, Context):
                raise TypeError(f"null_ctx must be a Context, got {type(null_ctx).__name__}")
            drop = generator.rand(b, dev) < self.cfg.cfg_dropout
            ctx = ctx.where(drop, null_ctx.to(dev))
        x_data = x_data.float()
        losses = []
        for k in range(self.cfg.num_groups):
            lo, hi = self.cfg.train_interval(k)
            s = lo + (hi - lo) * generator.rand(b, dev)
            sigma = s / 1000.0
            noise = generator.randn(x_data.shape, dev)
            sg = sigma[:, None, None, None]
            x_s = sg * noise + (1.0 - sg) * x_data
            v = self.group_velocity(k, x_s, sigma, ctx)
            losses.append(F.mse_loss(v.float(), noise - x_data))
        return torch.stack(losses).mean()

    def sample(self, ctx: Context, null_ctx: Optional[Context] = None, steps: int = 40, guidance: float = 5.0,
               generator: Optional[torch.Generator] = None, cuda_graphs: bool = True, progress: bool = False) -> Tensor:
        """Euler sampling with classifier-free guidance; see ``latteflow.core.sampler.sample``."""
        from latteflow.core.sampler import sample

        return sample(self, ctx, null_ctx, steps=steps, guidance=guidance, generator=generator,
                      cuda_graphs=cuda_graphs, progress=progress)
