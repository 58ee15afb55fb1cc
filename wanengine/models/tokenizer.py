"""Prompt tokenizer for the UMT5 text encoder: clean text, sentencepiece ids, EOS, pad to 512.

Behaviour follows `spec/t5.md` exactly (the golden `tokenizer_cases.json` checks it id for
id): `ftfy.fix_text` with its defaults, `html.unescape` twice, whitespace runs folded to one
space, plain sentencepiece `encode` (no BOS, no sampling), EOS id 1 appended, at most 511
pieces kept before the EOS, then padding with id 0 to `text_len`.
"""
from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import torch

from ..errors import CheckpointError

TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")
SPIECE_FILE = "spiece.model"
TEXT_LEN = 512
PAD_ID = 0
EOS_ID = 1

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The spec's prompt cleaning: ftfy defaults, HTML entities decoded twice, whitespace folded."""
    import ftfy  # imported lazily: only prompt encoding needs it

    text = ftfy.fix_text(text)
    # Twice, so that doubly-escaped entities such as `&amp;lt;` become `<` as in the reference.
    text = html.unescape(html.unescape(text))
    text = text.strip()
    return _WHITESPACE.sub(" ", text).strip()


class Tokenizer:
    """Sentencepiece tokenizer producing fixed-length `(ids, mask)` batches for the encoder."""

    def __init__(self, model_path: Union[str, "os.PathLike[str]"], text_len: int = TEXT_LEN):
        import sentencepiece as spm

        self.model_path = os.fspath(model_path)
        self.text_len = int(text_len)
        if self.text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad file
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{self.model_path}: not a readable sentencepiece model: {reason[:200]}") from exc
        if self._sp.get_piece_size() <= EOS_ID:
            raise CheckpointError(f"{self.model_path}: sentencepiece vocabulary too small "
                                  f"({self._sp.get_piece_size()} pieces)")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    def encode_one(self, text: str) -> List[int]:
        """Cleaned piece ids of one prompt followed by EOS, at most `text_len` long (unpadded)."""
        pieces = self._sp.encode(clean_prompt(text), out_type=int)
        return list(pieces[: self.text_len - 1]) + [EOS_ID]

    def __call__(self, texts: Union[str, Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tokenize prompts into `ids [B, text_len] int64` and `mask [B, text_len] int64`."""
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.text_len), PAD_ID, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.text_len), dtype=torch.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"prompt {row} is {type(text).__name__}, expected str")
            pieces = self.encode_one(text)
            ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.int64)
            mask[row, : len(pieces)] = 1
        return ids, mask


def tokenizer_path(ckpt_dir: Union[str, "os.PathLike[str]"]) -> Path:
    """Where the released layout keeps the sentencepiece model inside a checkpoint directory."""
    return Path(ckpt_dir) / TOKENIZER_SUBDIR / SPIECE_FILE


def load_tokenizer(ckpt_dir: Union[str, "os.PathLike[str]"], text_len: int = TEXT_LEN) -> Tokenizer:
    """Load the prompt tokenizer from `<ckpt_dir>/google/umt5-xxl/spiece.model`."""
    path = tokenizer_path(ckpt_dir)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected the tokenizer at "
                              f"<ckpt_dir>/{TOKENIZER_SUBDIR}/{SPIECE_FILE})")
    return Tokenizer(path, text_len=text_len)
