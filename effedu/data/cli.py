"""``python -m effedu.data [--regenerate]``: show one example of each synthetic and long-range task, or rewrite the corpus file."""
from __future__ import annotations

import argparse
from typing import Sequence

from .corpus import DEFAULT_N_SENTENCES, load_corpus, write_corpus
from .long_range import LONG_RANGE_TASKS, long_range_info, long_range_to_text, make_long_range
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
    print("long-range tasks (chapters 16, 20, 21; made at 256-4096 tokens, shown here at 64 tokens, text at 128 bytes):")
    for name in LONG_RANGE_TASKS:
        b = make_long_range(name, 1, 128 if name == "text" else 64, seed=0)
        info = long_range_info(name)
        label = b.targets[0, -1].item()
        print(f"{name:9s} vocab={info['vocab_size']:4d}  chance={info['chance']:.2f}  "
              f"{long_range_to_text(name, b.inputs[0])}   -> label {label}")
    text = load_corpus()
    print(f"corpus: {len(text)} characters, {CharTokenizer(text).vocab_size} distinct; first line:")
    print(text.splitlines()[0])
