"""The capstone's command line: run the measurements, write the results, print the LRA table or the decision guide.

    python -m effedu.capstone run [--quick] [--out PATH] [--reference] [--threads N] [--sections lra,grid,decode]
    python -m effedu.capstone show [--which reference|learner] [--path PATH]     # the mini-LRA table
    python -m effedu.capstone guide [--which reference|learner] [--path PATH]    # the decision guide (markdown)

``run`` writes the JSON results (default :data:`effedu.capstone.LEARNER`; ``--reference`` →
:data:`effedu.capstone.REFERENCE`) and two CSVs beside it: ``<stem>_lra.csv`` (one row per LRA run) and
``<stem>_grid.csv`` (one row per trade-off grid row).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from . import KIND, LEARNER, REFERENCE, SCHEMA_VERSION, load_results

COMMAND = "python -m effedu.capstone run"
SECTIONS = ("lra", "grid", "decode")

LRA_COLUMNS = ("variant", "task", "seq_len", "seed", "status", "why", "accuracy", "final_loss", "params",
               "train_step_ms", "infer_ms", "train_peak_mib", "infer_peak_mib", "train_seconds")
GRID_COLUMNS = ("mode", "device", "seq_len", "attention", "checkpointing", "precision", "int8", "status", "why",
                "step_ms", "peak_mib", "quality", "quality_metric", "params", "model_mib")


def _log_to_stderr(msg):
    print(msg, file=sys.stderr, flush=True)


def _sections(sections):
    if isinstance(sections, str):
        sections = [s.strip() for s in sections.split(",") if s.strip()]
    if not isinstance(sections, (list, tuple)) or not sections:
        raise ValueError(f"run: sections must be a non-empty list of {SECTIONS}, got {sections!r}")
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise ValueError(f"run: unknown sections {bad}; expected some of {list(SECTIONS)}")
    return [s for s in SECTIONS if s in sections]


def _section_fn(name):
    """The section's function, imported here so that each module is needed only when its section runs."""
    if name == "lra":
        from .lra import run_lra
        return run_lra
    if name == "grid":
        from .tradeoff import run_grid
        return run_grid
    from .decoding import run_decoding
    return run_decoding


def run(quick=False, *, sections=SECTIONS, threads=None, log=_log_to_stderr, command=None, lra_steps=None):
    """The whole results dict (schema in the common brief / :mod:`effedu.capstone`): the sections asked for
    (the others are None and take 0 seconds), the environment and the command."""
    from .. import cpu_description, env_report
    from .lra import thread_count

    sections = _sections(sections)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"run: threads must be a positive int or None, got {threads!r}")
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    env = env_report(print_report=False)  # may start numba's pool, which can change torch's threads: put it back
    torch.set_num_threads(before)
    if command is None:
        command = COMMAND + (" --quick" if quick else "") + (f" --threads {threads}" if threads else "") + (
            "" if list(sections) == list(SECTIONS) else f" --sections {','.join(sections)}")
    results = {"kind": KIND, "schema": SCHEMA_VERSION, "command": command, "quick": bool(quick), "seconds": 0.0,
               "sections_seconds": {s: 0.0 for s in SECTIONS}, "env": env, "cpu": cpu_description(),
               "lra": None, "grid": None, "decode": None}
    with thread_count(threads):
        results["env"]["cpu threads (torch)"] = torch.get_num_threads()
        for name in sections:
            ts = time.perf_counter()
            if log:
                log(f"capstone: section {name} …")
            extra = {"steps": lra_steps} if name == "lra" and lra_steps is not None else {}
            results[name] = _section_fn(name)(quick, log=log, threads=threads, **extra)
            results["sections_seconds"][name] = time.perf_counter() - ts
            if log:
                log(f"capstone: section {name} done in {results['sections_seconds'][name]:.0f} s")
    results["seconds"] = time.perf_counter() - t0
    return results


def _csv_path(path, suffix):
    path = Path(path)
    return path.with_name(f"{path.stem}_{suffix}.csv")


def _write_csv(path, columns, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def write_results(results, path):
    """Write ``results`` as JSON (indent 1) to ``path`` plus ``<stem>_lra.csv`` and ``<stem>_grid.csv`` beside it
    (header only where a section did not run). Returns the three paths."""
    if not isinstance(results, dict) or results.get("kind") != KIND:
        raise TypeError("write_results: results must be a capstone results dict (from run())")
    if not isinstance(path, (str, Path)):
        raise TypeError(f"write_results: path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    lra_csv, grid_csv = _csv_path(path, "lra"), _csv_path(path, "grid")
    _write_csv(lra_csv, LRA_COLUMNS, (results.get("lra") or {}).get("runs", []))
    _write_csv(grid_csv, GRID_COLUMNS, (results.get("grid") or {}).get("rows", []))
    return path, lra_csv, grid_csv


def _load(args):
    results = load_results(args.which, path=args.path)
    if results is None:
        where = args.path or (REFERENCE if args.which == "reference" else LEARNER)
        print(f"no results at {where}; run `{COMMAND}` first", file=sys.stderr)
    return results


def main(argv=None):
    """The command line (see the module docstring); returns the results dict (run) or the printed text."""
    parser = argparse.ArgumentParser(prog="python -m effedu.capstone", description=__doc__.strip().splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run the measurements and write the results")
    p_run.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds (the unit test)")
    p_run.add_argument("--out", type=Path, default=None, help=f"the JSON to write (default {LEARNER})")
    p_run.add_argument("--reference", action="store_true", help=f"write the course's reference file {REFERENCE}")
    p_run.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: unchanged)")
    p_run.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of lra,grid,decode")
    p_run.add_argument("--steps", type=int, default=None, help="training steps of every mini-LRA run (default "
                       "lra.SETTINGS['steps']; the LRA section's time grows in proportion)")
    for name, helptext in (("show", "print the mini-LRA table"), ("guide", "print the decision guide (markdown)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--which", choices=("reference", "learner"), default="learner")
        p.add_argument("--path", type=Path, default=None, help="a results file (instead of --which)")
    args = parser.parse_args(argv)

    if args.cmd == "run":
        if args.out is not None and args.reference:
            parser.error("--out and --reference are exclusive")
        out = args.out or (REFERENCE if args.reference else LEARNER)
        sections = _sections(args.sections)
        command = " ".join([COMMAND] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "run"])
        results = run(args.quick, sections=sections, threads=args.threads, command=command, lra_steps=args.steps)
        paths = write_results(results, out)
        print(f"wrote {paths[0]} ({results['seconds']:.0f} s), {paths[1].name}, {paths[2].name}")
        return results
    results = _load(args)
    if results is None:
        return None
    if args.cmd == "show":
        from .lra import format_table
        text = format_table(results["lra"]) if results.get("lra") else "(no lra section in these results)\n"
    else:
        from .guide import guide_markdown, load_chapter_results
        text = guide_markdown(results, chapter_results=load_chapter_results())
    print(text)
    return text


__all__ = ["run", "write_results", "main", "COMMAND", "SECTIONS", "LRA_COLUMNS", "GRID_COLUMNS"]
