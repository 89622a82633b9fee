"""Data for the course, made in code, in seconds, with nothing downloaded.

Every chapter trains or measures the same small Transformer on data from here:

    effedu.data.tasks       seven synthetic tasks (copy, reverse, sort, associative recall, ListOps, brackets,
                            mixed easy/hard spans) as ``Batch(inputs, targets)``; ``make_task(name, ...)``, ``to_text``
    effedu.data.long_range  four long-range classification tasks at 256–4096 tokens (needle, recall, ListOps with LRA's
                            operators, byte-level text), ``make_long_range(name, ...)``, ``long_range_info``
    effedu.data.corpus      the tiny English-like corpus ``data/tiny_corpus.txt`` and the seeded grammar that wrote it
    effedu.data.text        a character tokenizer and language-model batches (random windows of a token stream)
    effedu.data.sentences   300 topical evaluation sentences ``data/eval_sentences.tsv`` (the pretrained chapters)

    python -m effedu.data [--regenerate]        one example of each task, or rewrite ``data/tiny_corpus.txt``

Each synthetic task isolates one thing attention has to do, so that when a faster or lighter variant (sparse,
low-rank, kernelised, pruned, quantised ...) loses accuracy, we can say *which* ability it lost. Every random
choice takes ``seed=`` and draws from a local generator, never from a global RNG.
"""
from __future__ import annotations

from . import cli, corpus, long_range, sentences, tasks, text
from .corpus import (DEFAULT_CORPUS_PATH, DEFAULT_N_SENTENCES, LABELS, SENTENCE_KINDS, generate_corpus,
                     generate_labelled_sentences, load_corpus, write_corpus)
from .long_range import (LONG_RANGE_TASKS, long_range_info, long_range_to_text, make_long_listops, make_long_range,
                         make_long_recall, make_needle, make_text_classification)
from .sentences import generate_sentences, load_sentences, write_sentences
from .tasks import (
    BRACKET_CHARS,
    BRACKET_OPEN0,
    FIRST_SYMBOL,
    IGNORE,
    LISTOPS_CLOSE,
    LISTOPS_DIGIT0,
    LISTOPS_MAX,
    LISTOPS_MED,
    LISTOPS_MIN,
    LISTOPS_NAMES,
    LISTOPS_OPS,
    LISTOPS_SM,
    LISTOPS_VOCAB,
    MIXED_COPY,
    MIXED_DIGIT0,
    MIXED_SUM,
    N_SPECIAL,
    NUM_CLASSES,
    PAD,
    SEP,
    TASKS,
    Batch,
    evaluate_listops,
    is_balanced,
    make_associative_recall,
    make_brackets,
    make_copy,
    make_listops,
    make_mixed_difficulty,
    make_reverse,
    make_sort,
    make_task,
    recall_layout,
    task_vocab_size,
    to_text,
)
from .text import CharTokenizer, corpus_tokenizer, lm_batch, train_val_split

__all__ = [
    # submodules
    "cli", "corpus", "long_range", "sentences", "tasks", "text",
    # tasks
    "IGNORE", "PAD", "SEP", "FIRST_SYMBOL", "N_SPECIAL", "NUM_CLASSES", "TASKS", "Batch",
    "LISTOPS_DIGIT0", "LISTOPS_MAX", "LISTOPS_MIN", "LISTOPS_MED", "LISTOPS_SM", "LISTOPS_CLOSE", "LISTOPS_OPS",
    "LISTOPS_VOCAB", "LISTOPS_NAMES", "BRACKET_OPEN0", "BRACKET_CHARS",
    "make_copy", "make_reverse", "make_sort", "make_associative_recall", "recall_layout", "make_listops",
    "evaluate_listops", "make_brackets", "is_balanced", "make_mixed_difficulty", "MIXED_COPY", "MIXED_SUM",
    "MIXED_DIGIT0", "make_task", "task_vocab_size", "to_text",
    # long-range tasks (chapters 16, 20, the capstone)
    "LONG_RANGE_TASKS", "make_needle", "make_long_recall", "make_long_listops", "make_text_classification",
    "make_long_range", "long_range_info", "long_range_to_text",
    # corpus
    "DEFAULT_CORPUS_PATH", "DEFAULT_N_SENTENCES", "generate_corpus", "write_corpus", "load_corpus",
    "generate_labelled_sentences", "SENTENCE_KINDS", "LABELS",
    # text
    "CharTokenizer", "corpus_tokenizer", "train_val_split", "lm_batch",
    # sentences
    "generate_sentences", "load_sentences", "write_sentences",
]
