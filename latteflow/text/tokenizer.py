"""A character-level tokenizer that ships inside the package, so the digits model needs no download.

One id per character of a fixed alphabet (lowercase letters, digits, space, basic punctuation) after
a block of special ids::

    0 <pad>  1 <bos>  2 <eos>  3 <vision_start>  4 <vision_end>  5 <image_pad>  6 <video_pad>

The vision ids are never produced by :meth:`CharTokenizer.encode`; they exist so that a Qwen2-VL
config built for this vocabulary (``latteflow.text.backbones.tiny_qwen2vl_config``) points its
``image_token_id`` & co. at valid embedding rows.

A prompt encodes to ``<bos> chars... [<eos>]``; the null prompt ``""`` encodes to ``<bos> [<eos>]``,
so every context has at least one token. Padding defaults to the right: the valid tokens of every
row come first, which is what ``ctx_lens`` of ``latte_kernels.context_attention`` means, and what the
backbone's default positions (``0 .. L-1``) assume.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path
from typing import Sequence

import torch

from latteflow.core.files import atomic_write

__all__ = ["CharTokenizer", "DEFAULT_ALPHABET", "SPECIAL_TOKENS", "TOKENIZER_FILENAME"]

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<vision_start>", "<vision_end>", "<image_pad>", "<video_pad>")
DEFAULT_ALPHABET = string.ascii_lowercase + string.digits + " .,:;!?'\"-()/+&#"
TOKENIZER_FILENAME = "tokenizer.json"
_FORMAT = "latteflow-char-tokenizer"
_FORMAT_VERSION = 1
_PADDING_SIDES = ("right", "left")


def check_padding_side(padding_side) -> str:
    if padding_side not in _PADDING_SIDES:
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    return padding_side


def encode_batch(tokenizer, texts: str | Sequence[str], *, padding_side: str | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of a batch of prompts for any tokenizer with ``encode_one(text)``,
    ``pad_token_id`` and a default ``padding_side`` (the char tokenizer and the backbone's own): int64
    ``(B, L)``, ``L`` the longest prompt; padding holds the pad id and mask 0."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts must hold at least one prompt")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    side = tokenizer.padding_side if padding_side is None else check_padding_side(padding_side)
    rows = [tokenizer.encode_one(t) for t in texts]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(length - len(r), length)
        input_ids[b, sl] = torch.tensor(r, dtype=torch.long)
        attention_mask[b, sl] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


class CharTokenizer:
    """Fixed-vocabulary character tokenizer.

    ``alphabet``: the characters, in id order (ids start after the special tokens); each at most once.
    ``padding_side``: default side for :meth:`encode` (``"right"`` or ``"left"``).
    ``add_eos``: whether :meth:`encode` appends ``<eos>`` after the characters.
    """

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, *, padding_side: str = "right", add_eos: bool = True):
        if not isinstance(alphabet, str):
            raise TypeError(f"alphabet must be a str, got {type(alphabet).__name__}")
        if not alphabet:
            raise ValueError("alphabet must not be empty")
        if len(set(alphabet)) != len(alphabet):
            dup = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"alphabet repeats characters {dup!r}")
        if not isinstance(add_eos, bool):
            raise TypeError(f"add_eos must be a bool, got {type(add_eos).__name__}")
        self.alphabet = alphabet
        self.padding_side = check_padding_side(padding_side)
        self.add_eos = add_eos
        offset = len(SPECIAL_TOKENS)
        self._char_to_id = {c: offset + i for i, c in enumerate(alphabet)}

    # ---- ids -------------------------------------------------------------------------------------
    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    vision_start_token_id = 3
    vision_end_token_id = 4
    image_token_id = 5
    video_token_id = 6

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.alphabet)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"CharTokenizer(vocab_size={self.vocab_size}, padding_side={self.padding_side!r}, "
                f"add_eos={self.add_eos})")

    def __eq__(self, other) -> bool:
        return (isinstance(other, CharTokenizer) and self.alphabet == other.alphabet
                and self.padding_side == other.padding_side and self.add_eos == other.add_eos)

    # ---- encoding --------------------------------------------------------------------------------
    def encode_one(self, text: str) -> list[int]:
        """Ids of one prompt: ``[bos] + chars + ([eos] if add_eos)``. Unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = [self.bos_token_id]
        for pos, ch in enumerate(text):
            tid = self._char_to_id.get(ch)
            if tid is None:
                raise ValueError(
                    f"character {ch!r} at position {pos} of prompt {text!r} is not in the tokenizer's "
                    f"alphabet {self.alphabet!r}")
            ids.append(tid)
        if self.add_eos:
            ids.append(self.eos_token_id)
        return ids

    def encode(self, texts: str | Sequence[str], *, padding_side: str | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts (a single ``str`` is a batch of one).

        Returns ``(input_ids, attention_mask)``, both int64 of shape ``(B, L)`` with ``L`` the longest
        prompt's length; padded positions hold ``<pad>`` and mask 0. ``attention_mask.sum(1)`` is each
        row's context length (``ctx_lens``).
        """
        return encode_batch(self, texts, padding_side=padding_side, device=device)

    def __call__(self, texts, **kwargs):
        return self.encode(texts, **kwargs)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        """Text of one row of ids (a list, or a 1-D tensor). Special tokens are dropped by default."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        offset = len(SPECIAL_TOKENS)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids holds {i}, outside the vocabulary [0, {self.vocab_size})")
            if i < offset:
                if not skip_special_tokens:
                    out.append(SPECIAL_TOKENS[i])
            else:
                out.append(self.alphabet[i - offset])
        return "".join(out)

    def batch_decode(self, input_ids: torch.Tensor, *, skip_special_tokens: bool = True) -> list[str]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a 2-D tensor")
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in input_ids]

    # ---- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": _FORMAT, "version": _FORMAT_VERSION, "special_tokens": list(SPECIAL_TOKENS),
                "alphabet": self.alphabet, "padding_side": self.padding_side, "add_eos": self.add_eos}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a latteflow character tokenizer (format {d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("version") != _FORMAT_VERSION:
            raise ValueError(f"tokenizer format version {d.get('version')!r} is not supported (expected {_FORMAT_VERSION})")
        if list(d.get("special_tokens", [])) != list(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer special tokens {d.get('special_tokens')!r} differ from {list(SPECIAL_TOKENS)!r}")
        return cls(d["alphabet"], padding_side=d["padding_side"], add_eos=d["add_eos"])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer as JSON. ``path`` is a file, or a directory (then ``tokenizer.json`` in it).
        The write is atomic (temporary file + rename). Returns the file written."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        """Read a tokenizer written by :meth:`save` (a file, or a directory holding ``tokenizer.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        if not path.is_file():
            raise ValueError(f"path {str(path)!r} holds no tokenizer file")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
