"""The command line every chapter's precomputed sweep shares.

    python -m effedu.general.<chapter>_sweep [--quick] [--out PATH] [--threads N] [chapter options]

A sweep module defines ``run_sweep(...) -> dict`` (with ``env_report()``, the command and ``seconds`` inside) and a
three-line ``main``::

    def main(argv=None):
        return sweep_main(argv, command=COMMAND, description=__doc__, default_out=DEFAULT_OUT,
                          run=lambda args: run_sweep(args.quick, threads=args.threads))

The notebook loads the committed JSON (``data/results/<chapter>.json``); the unit test runs ``main(["--quick",
"--out", tmp])`` and checks the file's schema.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch


def log_to_stderr(msg):
    """Progress lines of a sweep: to stderr, flushed (stdout keeps the one "wrote …" line)."""
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to ``n`` for the block, restored after (None or 0: unchanged)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sweep_main(argv, *, command, description, default_out, run, threads=True, add_arguments=None, indent=None):
    """Parse the shared options, run the sweep, write its JSON; returns the results dict.

    ``run(args) -> dict``: ``args.quick`` (bool), ``args.threads`` (int or None, when ``threads``) and whatever
    ``add_arguments(parser)`` adds. ``indent``: the JSON layout (None: one compact line)."""
    first_line = (description or command).strip().splitlines()[0]
    parser = argparse.ArgumentParser(prog=command, description=first_line)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds (the unit test)")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write the JSON (default {default_out})")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch threads during the sweep "
                                                                     "(default: unchanged)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    out = Path(args.out or default_out)
    results = run(args)
    if not isinstance(results, dict):
        raise TypeError(f"sweep_main: run must return the results dict, got {type(results).__name__}")
    out.parent.mkdir(parents=True, exist_ok=True)
    separators = (",", ":") if indent is None else None
    out.write_text(json.dumps(results, indent=indent, separators=separators) + "\n", encoding="utf-8")
    seconds = results.get("seconds")
    print(f"wrote {out}" + (f" ({float(seconds):.0f} s)" if isinstance(seconds, (int, float)) else ""))
    return results


@contextlib.contextmanager
def torch_numba_threads(n):
    """torch's and numba's thread counts set to ``n`` for the block (None or 0: unchanged), restored after
    (numba's capped at its pool size, ``NUMBA_NUM_THREADS``)."""
    import numba

    old_t, old_n = torch.get_num_threads(), numba.get_num_threads()
    if n:
        torch.set_num_threads(n)
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(old_t)
        numba.set_num_threads(old_n)


__all__ = ["sweep_main", "log_to_stderr", "torch_threads", "torch_numba_threads"]
