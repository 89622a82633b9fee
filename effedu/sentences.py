"""The evaluation sentences now live in :mod:`effedu.data.sentences`; this module keeps ``effedu.sentences`` and
``python -m effedu.sentences --regenerate`` working."""
from __future__ import annotations

from .data.sentences import (
    DEFAULT_PATH,
    PER_TOPIC,
    TOPICS,
    generate_sentences,
    load_sentences,
    main,
    write_sentences,
)

__all__ = ["DEFAULT_PATH", "PER_TOPIC", "TOPICS", "generate_sentences", "load_sentences", "main", "write_sentences"]

if __name__ == "__main__":
    main()
