"""``LatteFlowConfig``: everything that shapes a LaTtE-Flow model besides its backbone (SPEC 3, 3.1).

A plain dataclass, JSON-serialisable through ``to_dict`` / ``from_dict``. Validation happens at
construction and raises ``ValueError`` / ``TypeError`` naming the offending field. The time
partition (which expert group owns which timestep) lives here because the model, the training loss
and the sampler all read it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

VARIANTS = ("couple", "blend", "vanilla_couple", "vanilla_blend")
BACKENDS = ("fused", "reference")
T_MAX = 1000.0
# Timesteps are compared with the boundaries after rounding to this many decimals, so a float32
# sigma that lands on a boundary (0.7 -> 699.99998) goes to the same group as the exact value.
_S_DECIMALS = 3
PAPER_BOUNDARIES_4 = (1000.0, 700.0, 450.0, 200.0, 0.0)  # the paper's appendix B, K = 4


def _pair(name: str, value: Any) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        a, b = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of positive ints (gh, gw), got {value!r}") from None
    for x in (a, b):
        if isinstance(x, bool) or not isinstance(x, int) or x <= 0:
            raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    return int(a), int(b)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value!r}")
    return float(value)


@dataclass
class LatteFlowConfig:
    """Configuration of the generation path.

    variant: ``couple`` (frozen VLM + trainable copy of every layer for image tokens), ``blend``
        (image tokens share each layer's q/k/v/o, keep their own norms and MLP; all parameters train),
        ``vanilla_couple`` / ``vanilla_blend`` (one group of all layers, no residual attention).
    num_groups: K expert groups of M = L / K consecutive layers (forced to 1 for ``vanilla_*``).
    latent_channels, grid_hw, patch_size: latents are ``(B, C, gh*p, gw*p)``; image tokens form a
        ``gh x gw`` grid. ``latent_hw`` (optional) is checked against ``grid_hw * patch_size``.
    boundaries: ``None`` (the paper's ``[1000, 700, 450, 200, 0]`` for K = 4, uniform otherwise),
        ``"uniform"``, or K + 1 numbers strictly decreasing from 1000 to 0. Group k owns
        ``s in (b[k+1], b[k]]`` at inference; training widens interior boundaries by overlap / 2.
    train_overlap: width (in timesteps) of the training overlap between adjacent groups.
    residual_attention: timestep-gated residual of the previous layer's logits (off for vanilla).
    backend: ``fused`` (``latte_kernels`` public ops) or ``reference`` (``latte_kernels.reference``).
    cfg_dropout: probability that a training sample's condition is replaced by the null prompt.
    timestep_dim: width of the sinusoidal timestep features fed to the timestep MLP.
    rope_theta: base of the 2D RoPE of image tokens (the Qwen2-VL vision-tower convention).
    num_layers: optional; when given it is checked against the backbone and against num_groups.
    """

    variant: str = "couple"
    num_groups: int = 4
    latent_channels: int = 32
    grid_hw: Tuple[int, int] = (8, 8)
    patch_size: int = 1
    boundaries: Optional[Union[str, Sequence[float]]] = None
    train_overlap: float = 100.0
    residual_attention: bool = True
    backend: str = "fused"
    cfg_dropout: float = 0.1
    timestep_dim: int = 256
    rope_theta: float = 10000.0
    latent_hw: Optional[Tuple[int, int]] = None
    num_layers: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. prompts, dataset)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self.num_groups = _positive_int("num_groups", self.num_groups)
        self.latent_channels = _positive_int("latent_channels", self.latent_channels)
        self.patch_size = _positive_int("patch_size", self.patch_size)
        self.timestep_dim = _positive_int("timestep_dim", self.timestep_dim)
        if self.timestep_dim % 2:
            raise ValueError(f"timestep_dim must be even (cos and sin halves), got {self.timestep_dim}")
        self.grid_hw = _pair("grid_hw", self.grid_hw)
        expected_hw = (self.grid_hw[0] * self.patch_size, self.grid_hw[1] * self.patch_size)
        if self.latent_hw is not None:
            self.latent_hw = _pair("latent_hw", self.latent_hw)
            if self.latent_hw != expected_hw:
                raise ValueError(
                    f"grid_hw {self.grid_hw} with patch_size {self.patch_size} covers a {expected_hw} latent, "
                    f"but latent_hw is {self.latent_hw}"
                )
        self.latent_hw = expected_hw
        self.train_overlap = _number("train_overlap", self.train_overlap, 0.0, T_MAX)
        self.cfg_dropout = _number("cfg_dropout", self.cfg_dropout, 0.0, 1.0)
        self.rope_theta = _number("rope_theta", self.rope_theta, 1e-6, float("inf"))
        if not isinstance(self.residual_attention, bool):
            raise TypeError(f"residual_attention must be a bool, got {self.residual_attention!r}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict, got {type(self.extra).__name__}")
        if self.is_vanilla:  # the paper's baselines: all layers every step, no residual attention
            self.num_groups = 1
            self.residual_attention = False
            if self.boundaries not in (None, "uniform") and list(self.boundaries) != [T_MAX, 0.0]:
                raise ValueError(f"boundaries of a vanilla variant must be [1000, 0], got {self.boundaries!r}")
            self.boundaries = None
        self.boundaries = self._resolve_boundaries(self.boundaries)
        if self.num_layers is not None:
            self.num_layers = _positive_int("num_layers", self.num_layers)
            self.check_num_layers(self.num_layers)

    # ------------------------------------------------------------------------------------------------
    def _resolve_boundaries(self, b) -> List[float]:
        k = self.num_groups
        if b is None:
            b = list(PAPER_BOUNDARIES_4) if k == 4 else "uniform"
        if isinstance(b, str):
            if b != "uniform":
                raise ValueError(f"boundaries must be None, 'uniform' or a list of numbers, got {b!r}")
            return [T_MAX * (k - i) / k for i in range(k + 1)]
        try:
            b = [float(x) for x in b]
        except (TypeError, ValueError):
            raise TypeError(f"boundaries must be None, 'uniform' or a list of numbers, got {b!r}") from None
        if len(b) != k + 1:
            raise ValueError(f"boundaries must hold num_groups + 1 = {k + 1} values, got {len(b)}: {b}")
        if b[0] != T_MAX or b[-1] != 0.0:
            raise ValueError(f"boundaries must run from 1000 down to 0, got {b}")
        if any(not math.isfinite(x) for x in b) or any(b[i] <= b[i + 1] for i in range(k)):
            raise ValueError(f"boundaries must be strictly decreasing, got {b}")
        return b

    def check_num_layers(self, num_layers: int) -> int:
        """Layers per group ``M = L / K``; ValueError when K does not divide L."""
        if num_layers % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} must divide the backbone's number of layers ({num_layers})"
            )
        return num_layers // self.num_groups

    @property
    def is_vanilla(self) -> bool:
        return self.variant.startswith("vanilla_")

    @property
    def is_blend(self) -> bool:
        return self.variant.endswith("blend")

    @property
    def num_tokens(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def token_dim(self) -> int:
        """Width of one patchified image token: ``C * p * p``."""
        return self.latent_channels * self.patch_size**2

    # ------------------------------------------------------------------------------------------------
    # the time partition
    def group_of(self, s: float) -> int:
        """The group owning timestep ``s`` at inference (strict partition ``(b[k+1], b[k]]``).

        ``s`` is rounded to 1e-3 first; ``s <= 0`` (never evaluated by the sampler) goes to the last
        group, ``s > 1000`` raises."""
        s = round(float(s), _S_DECIMALS)
        if not 0.0 <= s <= T_MAX:
            raise ValueError(f"timestep s = 1000 * sigma must lie in [0, 1000], got {s}")
        b = self.boundaries
        for k in range(self.num_groups):
            if s > b[k + 1]:
                return k
        return self.num_groups - 1

    def train_interval(self, k: int) -> Tuple[float, float]:
        """``(lo, hi)`` of group k's training timesteps: interior boundaries widened by overlap / 2,
        clamped to ``[0, 1000]``."""
        if not 0 <= k < self.num_groups:
            raise ValueError(f"group index must lie in [0, {self.num_groups}), got {k}")
        half = self.train_overlap / 2
        b = self.boundaries
        hi = b[k] + (half if k > 0 else 0.0)
        lo = b[k + 1] - (half if k + 1 < self.num_groups else 0.0)
        return max(lo, 0.0), min(hi, T_MAX)

    # ------------------------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid_hw"] = list(self.grid_hw)
        d["latent_hw"] = list(self.latent_hw)
        d["boundaries"] = list(self.boundaries)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LatteFlowConfig":
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown LatteFlowConfig fields: {unknown}")
        d = dict(d)
        for key in ("grid_hw", "latent_hw"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)
