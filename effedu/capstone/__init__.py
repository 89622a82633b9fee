"""Chapter 21, the capstone: a mini Long-Range Arena measured on this machine, the trade-off grid behind the
explorer, decoding speed, and the decision guide computed from those measurements.

    python -m effedu.capstone run [--quick]     # the whole measurement; writes results/capstone.json (+ .csv)
    python -m effedu.capstone guide             # the decision guide (markdown) from the results

The course's reference results (the machine that wrote the course) are committed under ``data/results/``
(:data:`REFERENCE`); a learner's own run goes to ``results/`` at the repository root (:data:`LEARNER`, not
committed). The notebook shows both side by side when both exist.

Modules: :mod:`.lra` (the mini-LRA), :mod:`.tradeoff` (combinations of the course's techniques on one model),
:mod:`.decoding` (time per generated token), :mod:`.reference` (Tay et al.'s LRA Tables 1–2), :mod:`.guide` (the
decision guide), :mod:`.run` (the command line).
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "data" / "results" / "capstone.json"  # committed: the course's reference machine
LEARNER = ROOT / "results" / "capstone.json"  # a learner's own run (git-ignored)
SCHEMA_VERSION = 1
KIND = "effedu.capstone"


def results_path(which="learner"):
    """The results file of ``which``: ``"reference"`` (committed) or ``"learner"`` (your own run)."""
    if which == "reference":
        return REFERENCE
    if which == "learner":
        return LEARNER
    raise ValueError(f"results_path: which must be 'reference' or 'learner', got {which!r}")


def load_results(which="reference", path=None):
    """The results dict of ``which`` (or of ``path``); None when that file does not exist yet."""
    p = Path(path) if path is not None else results_path(which)
    if not p.exists():
        return None
    results = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise ValueError(f"load_results: {p} is not a capstone results file (kind {KIND!r} expected)")
    if results.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"load_results: {p} has schema {results.get('schema')!r}, this effedu reads "
                         f"{SCHEMA_VERSION}; re-run `python -m effedu.capstone run`")
    return results


__all__ = ["ROOT", "REFERENCE", "LEARNER", "SCHEMA_VERSION", "KIND", "results_path", "load_results"]
