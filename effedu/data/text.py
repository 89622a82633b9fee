"""Tokenised text for the language-model chapters: a character tokenizer and random windows of a token stream.

``corpus_tokenizer()`` maps the shipped corpus to ids, one per character; ``train_val_split`` cuts the stream in two
contiguous parts, and ``lm_batch`` draws ``batch_size`` windows (seeded, from a local ``torch.Generator``) as a
:class:`~effedu.data.tasks.Batch` whose targets are the inputs shifted by one token.
"""
from __future__ import annotations

import torch

from .._checks import check_positive_int, check_seed
from .corpus import load_corpus
from .tasks import Batch

# --------------------------------------------------------------------------------------------------------------
# Character tokenizer and language-model batches
# --------------------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character: ``itos`` = the sorted distinct characters of the text, ``stoi`` its inverse."""

    def __init__(self, text: str):
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer: text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("CharTokenizer: text must not be empty")
        self.itos: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self):
        return len(self.itos)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str) -> torch.Tensor:
        """``LongTensor (len(text),)`` of character ids; unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.encode: text must be a str, got {type(text).__name__}")
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer.encode: character {e.args[0]!r} is not in the vocabulary "
                             f"({self.vocab_size} characters)") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        """The text of a 1-D ``LongTensor`` or a list of ids."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"CharTokenizer.decode: ids must be 1-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if not isinstance(ids, (list, tuple)):
            raise TypeError(f"CharTokenizer.decode: ids must be a 1-D tensor or a list of ints, "
                            f"got {type(ids).__name__}")
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"CharTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[0]}")
        return "".join(self.itos[int(i)] for i in ids)


def corpus_tokenizer(path=None) -> CharTokenizer:
    """The character tokenizer of the shipped corpus."""
    return CharTokenizer(load_corpus(path))


def _check_tokens(tokens, where):
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{where}: tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 1:
        raise ValueError(f"{where}: tokens must be 1-D (N_total,), got shape {tuple(tokens.shape)}")
    if tokens.dtype != torch.long:
        raise TypeError(f"{where}: tokens must have dtype torch.long, got {tokens.dtype}")


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous split: the first ``1 - val_fraction`` of the stream for training, the rest for validation.

    Contiguous, not shuffled windows: shuffled windows would overlap across the split and leak text.
    """
    _check_tokens(tokens, "train_val_split")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"train_val_split: val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_val = int(round(len(tokens) * val_fraction))
    if n_val == 0 or n_val == len(tokens):
        raise ValueError(f"train_val_split: val_fraction={val_fraction} of {len(tokens)} tokens leaves an empty part")
    return tokens[:-n_val], tokens[-n_val:]


def lm_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0) -> Batch:
    """``batch_size`` random windows of ``seq_len + 1`` tokens: inputs = window[:-1], targets = window[1:]."""
    where = "lm_batch"
    _check_tokens(tokens, where)
    check_positive_int(batch_size, "batch_size", where)
    check_positive_int(seq_len, "seq_len", where)
    if len(tokens) < seq_len + 1:
        raise ValueError(f"{where}: seq_len must be < len(tokens)={len(tokens)} (a window holds seq_len + 1 "
                         f"tokens), got {seq_len}")
    g = torch.Generator().manual_seed(check_seed(seed, where))
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)  # (B,)
    windows = tokens[starts[:, None] + torch.arange(seq_len + 1)]  # (B, L+1)
    return Batch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

