"""Asynchronous disk saves: staging into shared host memory, then a writer process of atoll's own.

`dcp.save` runs on a checkpoint thread with an `AsyncFileWriter`: DCP plans
on the checkpoint group as for any save, then `write_data` copies this
rank's chunks into one flat shared-memory buffer (allocated once, reused
while it is big enough; page-locked, and filled on a side stream, when the
chunks are on a GPU: checkpoint/device_copy.py), reports the copy done (the
live tensors may change again: the next optimizer step may run) and hands the chunks to a
`WriterProcess`, which writes them with `HashingFileSystemWriter` in DCP's
file format, fsyncs, and returns DCP's write results with each file's size
and SHA-256. The coordinator's `.metadata` and every collective stay in the
training process, so the writer needs no process group, no store and no
private torch API: a pipe, one buffer and DCP's public StorageWriter
interface.

The writer is spawned when the checkpointer is created (`start`), so that its
interpreter's start is paid during setup, not by the steps after the first
save; a save finding it dead spawns another. It ends when asked, when its pipe
closes, or when the process that started it is gone (polled: a rank killed
by SIGKILL cannot stop it). It must not know about models or the train loop.
"""

from __future__ import annotations

import mmap
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem
from torch.futures import Future

from atoll.checkpoint.dcp_io import ChunkSlot, FileHashes, HashingFileSystemWriter, chunk_slots, slot_view
from atoll.checkpoint.device_copy import SideStreamCopies, pin_host_memory, unpin_host_memory
from atoll.checkpoint.manifest import CheckpointError

PARENT_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0


class SharedBuffer:
    """A flat host buffer both processes map: an anonymous memory file (nothing to clean up
    on any exit), grown in place when a save needs more room; `tensor` is the mapping."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("atoll-ckpt-staging", os.MFD_CLOEXEC)
        else:  # no memfd: an unlinked temporary file serves the same way
            self.fd = os.dup(tempfile.TemporaryFile().fileno())
        self.size = 0
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self.pinned = False  # page-locked for device copies (CUDA), in this process
        self.pin_refused = False

    def ensure(self, nbytes: int, pin: bool = False) -> torch.Tensor:
        """At least `nbytes`, the same memory from save to save while it is big enough; `pin`
        (device tensors are staged) page-locks it once, as long as CUDA allows it."""
        if nbytes > self.size:
            self._unpin()
            os.ftruncate(self.fd, nbytes)
            self.size = nbytes
            self.tensor = _map(self.fd, nbytes)
        if pin and not self.pinned and not self.pin_refused:
            self.pinned = pin_host_memory(self.tensor)
            self.pin_refused = not self.pinned
        return self.tensor

    def _unpin(self) -> None:
        if self.pinned:
            unpin_host_memory(self.tensor)
            self.pinned = False

    def close(self) -> None:
        self._unpin()
        self.tensor = torch.empty(0, dtype=torch.uint8)
        os.close(self.fd)


def _map(fd: int, nbytes: int) -> torch.Tensor:
    # The mapping lives as long as the tensor over it.
    return torch.frombuffer(mmap.mmap(fd, nbytes), dtype=torch.uint8)


# ---------------------------------------------------------------- the writer process

def _die_with_parent(parent: int) -> None:
    """Polled, not PR_SET_PDEATHSIG: that fires when the *thread* that started the writer
    ends, and saves start it from a checkpoint thread."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="atoll-writer-parent-watch", daemon=True).start()


class _BufferPlanner:
    """What `FileSystemWriter.write_data` asks of a planner: each item's tensor, here a view
    of the shared buffer that owns exactly the chunk's bytes (so DCP writes it as it is)."""

    def __init__(self, buffer: torch.Tensor, slots: list[ChunkSlot]):
        array = buffer.numpy()
        self.tensors: dict[MetadataIndex, torch.Tensor] = {}
        for slot in slots:
            region = array[slot.offset:slot.offset + slot.nbytes]
            self.tensors[slot.index] = (torch.frombuffer(region, dtype=slot.dtype).view(slot.shape)
                                        if slot.nbytes else torch.empty(slot.shape, dtype=slot.dtype))

    def resolve_data(self, item: WriteItem) -> torch.Tensor:
        return self.tensors[item.index]


# The writer's command. It imports torch (seconds of CPU, during the first steps) under
# SCHED_IDLE: on cores it shares with training (CPU training, a host that also feeds the
# devices) every wake-up of a rank preempts it at once, where a merely niced process
# delays each wake-up by up to a scheduler slice, which shows as a slow rank. Then it
# runs niced (`_after_import`); a process may not leave SCHED_IDLE without CAP_SYS_NICE
# or RLIMIT_NICE, and there the writer stays idle-class (its saves take longer while
# training keeps every core busy).
WRITER_NICE = 10
_BOOT = ("import os, sys; os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)); "
         "from atoll.checkpoint.writer_process import main; main(sys.argv[1:])")


def _after_import() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except PermissionError:
        return
    os.nice(WRITER_NICE)


def main(argv: list[str]) -> None:
    """The writer process (`_BOOT`): arguments PARENT_PID SOCKET_FD BUFFER_FD."""
    parent, sock_fd, buffer_fd = (int(a) for a in argv)
    _after_import()
    _die_with_parent(parent)
    conn = Connection(sock_fd)
    buffer, mapped = torch.empty(0, dtype=torch.uint8), 0
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the training process is gone
            return
        if message[0] == "stop":
            return
        _, path, plan, slots, size = message
        try:
            if size != mapped:
                buffer, mapped = _map(buffer_fd, size), size
            writer = HashingFileSystemWriter(path, stable=(buffer.data_ptr(), mapped))
            results = writer.write_data(plan, _BufferPlanner(buffer, slots)).wait()
            conn.send(("ok", results, writer.hashes))
        except Exception as exc:  # reported to the saving rank, which fails the save
            conn.send(("error", f"{type(exc).__name__}: {exc}", None))


class WriterProcess:
    """One rank's writer process and the buffer it shares; `write(...)` blocks its caller
    (a checkpoint thread) until the files are written and fsynced.

    A plain child process (not multiprocessing's spawn, which would re-run the
    user's main script in it): the buffer's descriptor and one end of a
    socket pair are inherited, and messages are pickled plans and results."""

    def __init__(self) -> None:
        self.buffer = SharedBuffer()
        self._process: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Spawn the writer now if it is not running. Its start (a new interpreter importing
        torch: seconds of CPU) then overlaps the trainer's own setup instead of the steps
        after the first save, where it would take cores from training."""
        with self._lock:
            self._ensure_started()

    def write(self, path: str, plan: SavePlan, slots: list[ChunkSlot]) -> tuple[list, FileHashes]:
        with self._lock:
            self._ensure_started()  # also after a writer died: the next save gets a new one
            try:
                self._conn.send(("write", path, plan, slots, self.buffer.size))
                status, payload, hashes = self._conn.recv()
            except (EOFError, OSError):
                code = self._process.wait(STOP_TIMEOUT_S)
                self._process = None
                raise CheckpointError(f"the checkpoint writer process died (exit code {code})") from None
        if status != "ok":
            raise CheckpointError(f"the checkpoint writer could not write {path}: {payload}")
        return payload, hashes

    def _ensure_started(self) -> None:
        if self._process is None or self._process.poll() is not None:
            self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(os.getpid()), str(theirs.fileno()), str(self.buffer.fd)],
                pass_fds=(theirs.fileno(), self.buffer.fd), stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    def stop(self, wait: bool = True) -> None:
        """Ask the writer to exit, end it if it does not within STOP_TIMEOUT_S; free the buffer.

        `wait=False` (the error path) returns at once and a daemon thread reaps the writer: a
        process that goes on serving (a survivor of a failed group) must not wait for an
        interpreter's exit."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if process is not None:
            try:
                conn.send(("stop",))
            except OSError:
                pass
            if wait:
                _reap(process, conn)
            else:
                threading.Thread(target=_reap, args=(process, conn), daemon=True,
                                 name="atoll-writer-reaper").start()
        self.buffer.close()


def _reap(process: subprocess.Popen, conn: Connection) -> None:
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    conn.close()


# ---------------------------------------------------------------- DCP's side

class AsyncFileWriter(HashingFileSystemWriter):
    """DCP's file writer whose `write_data` stages this rank's chunks into the buffer it
    shares with `process`, calls `on_staged`, and has `process` write them; `hashes` then
    holds the files' sizes and SHA-256. Planning, `.metadata` and file names are
    FileSystemWriter's own."""

    def __init__(self, path: Any, process: WriterProcess, on_staged: Callable[[], None],
                 copies: Optional[SideStreamCopies] = None):
        super().__init__(path)
        self.process, self.on_staged = process, on_staged
        self.copies = copies if copies is not None else SideStreamCopies()
        self._written: FileHashes = {}

    @property
    def hashes(self) -> FileHashes:
        return {**self._written, **self.fs.hashes}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        copies = self.copies
        try:
            slots, total = chunk_slots(plan.items, "disk checkpoints")
            buffer = self.process.buffer.ensure(total, pin=copies.on_device)
            with copies.copying():  # CUDA: on the side stream, into the (pinned) shared buffer
                for slot, item in zip(slots, plan.items):
                    chunk = planner.resolve_data(item).detach()
                    if tuple(chunk.shape) != slot.shape:
                        raise CheckpointError(f"{item.index.fqn}: chunk {tuple(chunk.shape)} is not the "
                                              f"planned {slot.shape}")
                    copies.copy(slot_view(buffer, slot), chunk)
        finally:
            # Copied (or queued: the loop's stream waits for them), or failed: either way
            # training need not wait any longer.
            self.on_staged()
        copies.wait_done()  # the writer process reads what the copies put there
        results, self._written = self.process.write(str(self.path), plan, slots)
        done: Future = Future()
        done.set_result(results)
        return done


if __name__ == "__main__":
    main(sys.argv[1:])
