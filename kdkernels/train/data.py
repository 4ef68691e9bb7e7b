"""The trainer's corpus: text -> token ids -> a fixed train/validation split -> batches.

The default corpus is the English help text that ships with CPython (``pydoc_data.topics``,
about 465 KB), so the demo needs no download. Tokens are bytes (vocabulary 256) unless a
Hugging Face tokenizer is given.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

BYTE_VOCAB = 256


def default_text() -> str:
    """CPython's help topics, joined in sorted key order (a fixed, reproducible text)."""
    from pydoc_data.topics import topics

    return "\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Corpus:
    """Token ids split once: the first ``1 - val_fraction`` for training, the rest for validation."""

    train: torch.Tensor  # [n_train] uint8 (bytes) or int32 (tokenizer ids)
    validation: torch.Tensor  # [n_val]
    vocab_size: int
    name: str
    digest: str  # sha256 of the text and the tokenizer: part of the teacher cache key


def tokenize(text: str, tokenizer=None) -> torch.Tensor:
    if tokenizer is None:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int32)


def load_corpus(path: Optional[str] = None, *, val_fraction: float = 0.1, max_bytes: Optional[int] = None,
                tokenizer=None, min_tokens: int = 0) -> Corpus:
    """Reads ``path`` (UTF-8 text; invalid bytes replaced) or the default corpus and splits it.

    ``max_bytes`` keeps only the first bytes of the text (quick runs). ``min_tokens`` is the
    smallest split the caller can cut windows from; a shorter split is an error.
    """
    if path is None:
        text, name = default_text(), "pydoc_data.topics"
    else:
        with open(path, "rb") as handle:
            text, name = handle.read().decode("utf-8", errors="replace"), str(path)
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    tokens = tokenize(text, tokenizer)
    n_val = int(len(tokens) * val_fraction)
    train, validation = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
    if min(len(train), len(validation)) < min_tokens:
        raise ValueError(
            f"the corpus {name!r} is too short: {len(tokens)} tokens give train/validation splits of "
            f"{len(train)}/{len(validation)}, and each needs at least {min_tokens}")
    tokenizer_name = "bytes" if tokenizer is None else getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
    digest = hashlib.sha256(text.encode("utf-8") + b"\0" + tokenizer_name.encode() +
                            f"\0{val_fraction}".encode()).hexdigest()
    vocab = BYTE_VOCAB if tokenizer is None else len(tokenizer)
    return Corpus(train=train, validation=validation, vocab_size=vocab, name=name, digest=digest)


def train_batches(tokens: torch.Tensor, *, batch_size: int, context: int, steps: int,
                  seed: int) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``[batch_size, context + 1]`` windows at random offsets.

    The offsets come from a generator seeded with ``seed`` alone, so every run with the same seed
    sees the same batches in the same order.
    """
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - context, (batch_size, 1), generator=generator)
        yield tokens[starts + offsets].long()


def validation_windows(tokens: torch.Tensor, *, context: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Consecutive non-overlapping ``[n, context + 1]`` windows from the start of the split."""
    count = (len(tokens) - 1) // context
    if max_windows is not None:
        count = min(count, max_windows)
    starts = torch.arange(count).unsqueeze(1) * context
    return tokens[starts + torch.arange(context + 1)].long()
