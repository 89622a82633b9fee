"""``python -m effedu.data [--regenerate]``: show one example of each synthetic task, or rewrite the corpus file."""
from __future__ import annotations

import argparse
from typing import Sequence

from .corpus import DEFAULT_N_SENTENCES, load_corpus, write_corpus
from .tasks import NUM_CLASSES, TASKS, make_task, task_vocab_size, to_text
from .text import CharTokenizer


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m effedu.data",
                                 description="Show the synthetic tasks, or regenerate data/tiny_corpus.txt.")
    ap.add_argument("--regenerate", action="store_true", help="rewrite data/tiny_corpus.txt from the grammar")
    ap.add_argument("--out", default=None, help="write the corpus here instead of data/tiny_corpus.txt")
    args = ap.parse_args(argv)
    if args.regenerate:
        p = write_corpus(args.out)
        print(f"wrote {p} ({p.stat().st_size} bytes, generate_corpus(n_sentences={DEFAULT_N_SENTENCES}, seed=0))")
        return
    for name in TASKS:
        b = make_task(name, 1, 24, seed=0)
        scored = b.targets[0][b.mask[0]]
        answer = f"label {scored.item()}" if name in NUM_CLASSES else to_text(name, scored)
        print(f"{name:9s} vocab={task_vocab_size(name):3d}  {to_text(name, b.inputs[0])}   -> scored: {answer}")
    text = load_corpus()
    print(f"corpus: {len(text)} characters, {CharTokenizer(text).vocab_size} distinct; first line:")
    print(text.splitlines()[0])
