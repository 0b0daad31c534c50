"""A character tokenizer: the characters of the training text plus [PAD] and [MASK]."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import Tensor

PAD, MASK = "[PAD]", "[MASK]"
SPECIAL_TOKENS = 2
"""[PAD] and [MASK] are ids 0 and 1; ordinary characters start at this id."""
VOCAB_FILE = "vocab.json"


class CharTokenizer:
    """Ids 0 and 1 are [PAD] and [MASK]; the characters follow in sorted order."""

    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary has repeated characters")
        self.itos: list[str] = [PAD, MASK] + list(chars)
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.mask_id = 0, 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def special_ids(self) -> tuple[int, int]:
        return (self.pad_id, self.mask_id)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> Tensor:
        """Ids (len(text),) of a text; characters outside the vocabulary are a clear error."""
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r} "
                             f"({', '.join(repr(c) for c in unknown[:10])}); remove or replace them")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.itos[int(i)] if int(i) >= SPECIAL_TOKENS else "" for i in ids)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocab.json`` atomically (a temporary file renamed into place)."""
        path = Path(directory) / VOCAB_FILE
        fd, tmp = tempfile.mkstemp(prefix=f".{VOCAB_FILE}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"itos": self.itos[SPECIAL_TOKENS:]}, f, ensure_ascii=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CharTokenizer":
        """The tokenizer saved in ``directory``; a missing or malformed file is one ValueError naming it."""
        path = Path(directory) / VOCAB_FILE
        if not path.exists():
            raise ValueError(f"no {VOCAB_FILE} in {str(directory)!r}; is it an mlpmixer text run directory?")
        try:
            chars = json.loads(path.read_text(encoding="utf-8"))["itos"]
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise ValueError(f"{path} is not a valid vocabulary file ({type(e).__name__}: {e})") from None
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError(f"{path} is not a valid vocabulary file: 'itos' must be a list of single characters")
        if len(set(chars)) != len(chars):
            raise ValueError(f"{path} is not a valid vocabulary file: it repeats characters")
        return cls(chars)
