"""Prompts through a pretrained backbone's own tokenizer (SPEC 3.2).

``ChatPromptTokenizer.from_pretrained(backbone_dir)`` wraps ``AutoTokenizer.from_pretrained`` behind
the interface the model, the training loops and the pipelines use for ``CharTokenizer``:
``encode(texts, padding_side=None, device=None) -> (input_ids, attention_mask)`` with right padding by
default (valid tokens first: the ``ctx_lens`` contract of the context attention).

When the tokenizer has a chat template, a prompt is one user turn with the generation prompt added
(what Qwen2-VL-Instruct saw in training), so the null prompt ``""`` still yields tokens: Qwen2
tokenizers add no BOS, and a bare ``""`` would tokenise to nothing. Without a chat template the
prompt goes through the tokenizer with its special tokens; a prompt that still yields no token is
refused (``build_context`` needs at least one).
"""
from __future__ import annotations

import os
from typing import List, Sequence

import torch

from latteflow.text.tokenizer import check_padding_side, encode_batch

__all__ = ["ChatPromptTokenizer"]



class ChatPromptTokenizer:
    """A Hugging Face tokenizer with the ``CharTokenizer`` call interface.

    ``tokenizer``: a ``transformers`` tokenizer (``PreTrainedTokenizerBase``); ``folder``: where it was
    loaded from (recorded by checkpoints); ``padding_side``: default side for :meth:`encode`."""

    def __init__(self, tokenizer, *, folder: str | None = None, padding_side: str = "right"):
        if not callable(getattr(tokenizer, "convert_tokens_to_ids", None)):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        self.folder = folder
        self.padding_side = check_padding_side(padding_side)
        self.uses_chat_template = bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_token_id = 0 if pad is None else int(pad)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **kwargs) -> "ChatPromptTokenizer":
        """The tokenizer saved in ``folder`` (a backbone folder); ValueError naming it when there is none."""
        from transformers import AutoTokenizer

        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"backbone folder {folder!r} does not exist")
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"folder {folder!r} holds no tokenizer AutoTokenizer can read ({first})") from None
        return cls(tok, folder=folder, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"ChatPromptTokenizer({self.folder!r}, vocab_size={self.vocab_size}, "
                f"chat_template={self.uses_chat_template}, padding_side={self.padding_side!r})")

    def text_of(self, prompt: str) -> str:
        """The text the tokenizer sees for ``prompt`` (the chat turn when there is a template)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if not self.uses_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode_one(self, text: str) -> List[int]:
        """Ids of one prompt (chat turn + generation prompt, or the tokenizer's own special tokens)."""
        full = self.text_of(text)
        ids = self.tokenizer(full, add_special_tokens=not self.uses_chat_template)["input_ids"]
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError(f"prompt {text!r} tokenises to no token (the tokenizer in {self.folder!r} has no chat "
                             f"template and adds no special tokens)")
        return ids

    def encode(self, texts: str | Sequence[str], *, padding_side: str | None = None,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, int64 ``(B, L)``, ``L`` the longest prompt; padding holds the
        pad id and mask 0 (right padding unless ``padding_side="left"``)."""
        return encode_batch(self, texts, padding_side=padding_side, device=device)

    def __call__(self, texts, **kwargs):
        return self.encode(texts, **kwargs)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
