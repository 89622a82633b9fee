"""Replaying random numbers: record the generators' state now, run code with that state later.

Gradient checkpointing (chapter 02) and reversible layers (chapter 03) run a forward computation a second time in
the backward pass. Dropout inside it must draw *the same* masks as the first time, or the gradients belong to a
different network (with an unchanged loss: a silent bug). So before the first run we record the state of the CPU
generator and of the CUDA generators the inputs live on; around the second run we

    fork → set the recorded state → run → restore the state the generators had just before

(``torch.random.fork_rng`` does the fork and the restore), so the replay consumes no random numbers of its own:
a step with recomputation draws exactly the numbers of a plain one.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["RngState", "replay_rng", "cuda_devices"]


def cuda_devices(tensors):
    """The sorted CUDA device indices of ``tensors`` (non-tensors and CPU tensors are skipped)."""
    return sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                   for t in tensors if isinstance(t, torch.Tensor) and t.is_cuda})


class RngState:
    """The CPU generator's state and that of every CUDA device ``tensors`` live on, at one moment."""

    __slots__ = ("cpu", "cuda")

    def __init__(self, tensors=()):
        self.cpu = torch.get_rng_state()
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in cuda_devices(tensors)}

    @contextlib.contextmanager
    def replay(self):
        """Inside: the generators are where they were when this state was taken. After: back where they are now."""
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for d, state in self.cuda.items():
                torch.cuda.set_rng_state(state, d)
            yield


def replay_rng(state):
    """``state.replay()``, or a context that does nothing when ``state`` is None (no replay asked for)."""
    return state.replay() if state is not None else contextlib.nullcontext()
