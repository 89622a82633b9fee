"""Process plumbing for the chapters that run *real* processes on this machine (09 pipeline, 10 expert parallelism).

One way to start ``n_procs`` processes, connect them with ``torch.distributed`` and bring back what each one
computed, shared by ``effedu.general.pipeline`` (one process per pipeline stage) and
``effedu.general.expert_parallel`` (one process per group of experts):

- :func:`launch` starts the processes (``torch.multiprocessing``, *spawn*), waits for all of them under one
  deadline, and **always** joins or terminates them (on success, on an error in any process, on timeout), then
  reads each rank's payload from a temporary directory (removed afterwards);
- inside a process, :func:`init_gloo` joins the process group: the gloo backend, rendezvous through a *file*
  (``torch.distributed.FileStore``, no network port), on the loopback interface only (:func:`loopback_only`),
  with a timeout on every collective and ``threads`` intra-op threads;
- :func:`write_result` hands a payload (or a traceback: ``{"error": text}``) back to the parent, atomically.

A worker is a module-level function ``worker(rank, world_size, store_path, result_dir, spec)`` (spawn pickles it by
name); the pattern::

    def worker(rank, world_size, store_path, result_dir, spec):
        dist = None
        try:
            dist = init_gloo(rank, world_size, store_path, spec["timeout"], spec["threads"])
            ...
            write_result(result_dir, rank, {"results": ...})
        except BaseException:
            write_result(result_dir, rank, {"error": traceback.format_exc()})
            raise
        finally:
            if dist is not None and dist.is_initialized():
                dist.destroy_process_group()

On GPUs the same code runs with the nccl backend (one device per rank); this course only uses gloo on the CPU.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch


def loopback_only():
    """Make gloo use the loopback interface (nothing leaves this machine).

    Call it only inside a spawned process (:func:`init_gloo` does): the variable ends with that process and the
    parent's environment is never touched. An interface already chosen (``GLOO_SOCKET_IFNAME`` set) is kept.
    """
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        if sys.platform.startswith("linux"):
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        elif sys.platform == "darwin":
            os.environ["GLOO_SOCKET_IFNAME"] = "lo0"


def init_gloo(rank, world_size, store_path, timeout, threads=1):
    """Join the process group from inside a spawned process; returns the ``torch.distributed`` module.

    gloo backend, loopback only, rendezvous through the file ``store_path`` (a ``FileStore``: every rank opens the
    same file), ``timeout`` seconds for every collective (a rank that never answers raises instead of hanging),
    ``threads`` intra-op threads for this process (its own setting: it ends with the process).
    """
    import torch.distributed as dist

    loopback_only()
    torch.set_num_threads(threads)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))
    return dist


def write_result(result_dir, rank, payload):
    """Save ``payload`` (tensors, numbers, strings, lists, dicts) as rank ``rank``'s result, atomically."""
    path = os.path.join(result_dir, f"rank{rank}.pt")
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)  # the parent never reads half a file


def launch(worker, where, n_procs, spec, timeout, *, what="stage"):
    """Run ``worker(rank, n_procs, store_path, result_dir, spec)`` in ``n_procs`` spawned processes; their payloads.

    Waits for all of them until ``timeout`` seconds have passed (then terminates them and raises ``TimeoutError``).
    Every process is joined, or terminated (then killed) if it is still alive, whatever happens. A process that
    wrote ``{"error": traceback}`` (or died) makes it raise ``RuntimeError`` with the tracebacks, each headed by
    ``--- {what} {rank} ---``. Returns the list of per-rank payloads (what each passed to :func:`write_result`).
    From a script, call it under ``if __name__ == "__main__":`` (spawn re-imports the main module in every child).
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="effedu_procs_") as tmp:
        store_path = os.path.join(tmp, "store")  # the rendezvous: a file, no network port
        ctx = mp.start_processes(worker, args=(n_procs, store_path, tmp, spec), nprocs=n_procs, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        failure = None
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{where}: the {n_procs} {what} processes did not finish within timeout={timeout} s "
                                       f"(they were terminated)")
                try:
                    if ctx.join(timeout=min(remaining, 1.0)):
                        break
                except Exception as exc:  # a process raised or died: report its traceback
                    failure = exc
                    break
        finally:
            for p in ctx.processes:  # never leave a process behind
                if p.is_alive():
                    p.terminate()
                p.join(5)
                if p.is_alive():  # pragma: no cover - terminate ignored
                    p.kill()
                    p.join()
        payloads = []
        for rank in range(n_procs):
            path = os.path.join(tmp, f"rank{rank}.pt")
            payloads.append(torch.load(path, weights_only=True) if os.path.exists(path) else None)
    errors = [(r, p["error"]) for r, p in enumerate(payloads) if p is not None and "error" in p]
    if errors or failure is not None:
        detail = "\n".join(f"--- {what} {r} ---\n{tb}" for r, tb in errors) or str(failure)
        raise RuntimeError(f"{where}: a {what} process failed:\n{detail}")
    missing = [r for r, p in enumerate(payloads) if p is None]
    if missing:
        raise RuntimeError(f"{where}: {what} processes {missing} exited without a result")
    return payloads


__all__ = ["loopback_only", "init_gloo", "write_result", "launch"]
