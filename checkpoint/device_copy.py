"""Copies of a training state's tensors into host buffers, beside the train loop.

Memory snapshots (checkpoint/snapshot.py) and asynchronous disk checkpoints
(checkpoint/writer_process.py) copy the state on a thread of their own while
the next forward/backward runs. On CUDA those copies go on a side stream into
pinned host buffers that the caller allocates once and reuses: the stream first
waits for everything the train loop has queued (the optimizer step that made
the state), and the loop's stream waits for the copies before the next
optimizer step changes the state, so the loop itself never blocks on them. On
CPU the same calls copy synchronously and wait for nothing.

This module knows tensors, streams and pinned memory, not state dicts, stores
or models.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional

import torch


class SideStreamCopies:
    """The copies of one state at a time, in four moves:

    1. `begin(tensors)` on the train loop's thread once the state is final;
    2. on the copying thread, `enter_thread()` first, then `copy(...)` or `copy_all(...)` inside `copying()`;
    3. `wait_on_loop()` on the train loop's thread before the state changes (GPU-side wait);
    4. `wait_done()` on the copying thread before anything reads the host buffers.

    The stream is created once and reused, as are the caller's buffers.
    """

    def __init__(self) -> None:
        self.device: Optional[torch.device] = None  # the state's CUDA device; None: copies on the host
        self.stream: Optional["torch.cuda.Stream"] = None
        self._started: Optional["torch.cuda.Event"] = None
        self._done: Optional["torch.cuda.Event"] = None
        self._loop_waits = False

    @property
    def on_device(self) -> bool:
        return self.device is not None

    def begin(self, tensors: Iterable[torch.Tensor]) -> None:
        """The copies to come see what the loop has queued so far, and nothing later."""
        self.device = next((t.device for t in tensors if t.device.type == "cuda"), None)
        self._started = self._done = None
        self._loop_waits = False
        if self.device is None:
            return
        if self.stream is None or self.stream.device != self.device:
            self.stream = torch.cuda.Stream(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def enter_thread(self) -> None:
        """A new thread's CUDA calls go to device 0 until told otherwise: to the state's device."""
        if self.device is not None:
            torch.cuda.set_device(self.device)

    @contextlib.contextmanager
    def copying(self) -> Iterator[None]:
        """Copies issued inside run on the side stream; an event marks their end (also when
        one of them failed: the loop must still wait for those already queued)."""
        if self.device is None:
            yield
            return
        with torch.cuda.stream(self.stream):
            self._started = torch.cuda.Event(enable_timing=True)
            self._started.record(self.stream)
            try:
                yield
            finally:
                done = torch.cuda.Event(enable_timing=True)
                done.record(self.stream)
                self._done = done
                self._loop_waits = True

    def copy(self, target: torch.Tensor, source: torch.Tensor) -> None:
        """`target.copy_(source)`; a device source is copied asynchronously on the side stream."""
        if source.is_cuda and self.device is not None:
            # The loop may free `source` while the copy is queued: its memory is not reused before.
            source.record_stream(self.stream)
            target.copy_(source, non_blocking=True)
        else:
            target.copy_(source)

    def copy_all(self, targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
        """`copy` of every pair. On the host one call copies them all: no Python per tensor,
        and the GIL is released for the whole copy, so the train loop's thread runs meanwhile."""
        if self.device is None:  # `begin` saw no tensor on a GPU
            if targets:
                torch._foreach_copy_(targets, sources)
            return
        for target, source in zip(targets, sources):
            self.copy(target, source)

    def wait_on_loop(self) -> None:
        """On the train loop's thread: what it queues from now on runs after the copies."""
        if self._loop_waits and self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._loop_waits = False

    def wait_done(self) -> None:
        """On the copying thread: the host buffers hold the copies."""
        if self._done is not None:
            self._done.synchronize()

    def device_seconds(self) -> float:
        """How long the side stream spent on the copies (after `wait_done`); 0 on the host."""
        if self._started is None or self._done is None:
            return 0.0
        return self._started.elapsed_time(self._done) / 1000.0


def pin_host_memory(tensor: torch.Tensor) -> bool:
    """Page-lock memory the caller allocated itself (a shared mapping), as torch's own DCP
    staging does: device copies into it then run as DMA instead of through a bounce buffer.
    False (the memory stays pageable, copies still correct) when CUDA refuses it."""
    if not torch.cuda.is_available() or tensor.numel() == 0:
        return False
    status = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(),
                                                      1))  # cudaHostRegisterPortable
    return status == 0


def unpin_host_memory(tensor: torch.Tensor) -> None:
    """Undo `pin_host_memory` before the memory is unmapped."""
    torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())
