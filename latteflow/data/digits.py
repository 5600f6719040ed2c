"""The handwritten digits of scikit-learn (``sklearn.datasets.load_digits``, shipped in its wheel).

1797 images of 8x8 pixels with values 0..16 (0 = background), scaled to float32 in [-1, 1] as
``x / 8 - 1`` and laid out ``(N, 1, 8, 8)``: with the pixel autoencoder (latent_channels=1,
patch_size=1) that is 64 image tokens on an (8, 8) grid. Prompts are ``"digit 0"`` .. ``"digit 9"``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["DIGIT_PROMPTS", "DigitsSplit", "GRID_HW", "IMAGE_SHAPE", "NUM_CLASSES", "iterate_batches",
           "label_from_prompt", "load_digits_split", "prompts_for"]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)          # (channels, height, width) of one digit
GRID_HW = (8, 8)                 # token grid with patch_size=1
DIGIT_PROMPTS = tuple(f"digit {d}" for d in range(NUM_CLASSES))
_PROMPT_RE = re.compile(r"digit ([0-9])")


@dataclass(frozen=True)
class DigitsSplit:
    """A fixed, stratified train / held-out split. Images float32 ``(N, 1, 8, 8)`` in [-1, 1], labels int64 ``(N,)``."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    seed: int
    test_fraction: float


@lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """All 1797 digits split stratified by class, ``test_fraction`` held out; the split depends only
    on ``seed``. Tensors are fresh copies (callers may modify them)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, float) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    from sklearn.model_selection import train_test_split

    images, labels = _raw_digits()
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=labels)
    idx_train.sort()
    idx_test.sort()

    def pack(idx):
        x = torch.from_numpy(images[idx] / 8.0 - 1.0).to(torch.float32).unsqueeze(1)
        return x.contiguous(), torch.from_numpy(labels[idx].copy())

    tr_x, tr_y = pack(idx_train)
    te_x, te_y = pack(idx_test)
    return DigitsSplit(tr_x, tr_y, te_x, te_y, seed, test_fraction)


def prompts_for(labels: Sequence[int] | torch.Tensor | np.ndarray) -> list[str]:
    """``["digit 3", ...]`` for the given class labels (ints in 0..9)."""
    values = labels.tolist() if isinstance(labels, (torch.Tensor, np.ndarray)) else list(labels)
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < NUM_CLASSES:
            raise ValueError(f"labels[{i}] must be an int in 0..9, got {v!r}")
        out.append(DIGIT_PROMPTS[v])
    return out


def label_from_prompt(prompt: str) -> int:
    """The digit a prompt asks for: ``"digit 7"`` -> 7. Anything else raises ``ValueError``."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    m = _PROMPT_RE.fullmatch(prompt.strip())
    if m is None:
        raise ValueError(f"prompt {prompt!r} is not of the form 'digit N' with N in 0..9")
    return int(m.group(1))


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                    generator: torch.Generator | None = None,
                    seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(images, labels)`` batches of exactly ``batch_size`` rows: the data is walked in a fresh
    random order each epoch (a batch may span two epochs). The order comes from ``generator`` (a CPU
    ``torch.Generator``) or else from ``seed`` (default 0); the global RNG is never touched."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("images and labels must be torch tensors")
    if images.dim() < 1 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} must have the same "
                         "number of rows, labels 1-D")
    if images.shape[0] == 0:
        raise ValueError("images must hold at least one row")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if generator is not None and seed is not None:
        raise ValueError("pass generator or seed, not both")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    elif generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
    return _batches(images, labels, batch_size, generator)


def _batches(images, labels, batch_size, generator):
    n = images.shape[0]
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        idx, order = order[:batch_size], order[batch_size:]
        yield images[idx.to(images.device)], labels[idx.to(labels.device)]
