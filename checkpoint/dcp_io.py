"""torch.distributed.checkpoint (DCP) plumbing: safe reading, hashed writing, host staging.

- `SafeFileSystemReader` reads DCP's `.metadata` with an unpickler that only
  admits DCP's own metadata classes, torch sizes and dtypes: loading a
  checkpoint never runs arbitrary pickled code. atoll saves only tensors
  through DCP (non-tensor state lives in the JSON manifest), so no pickled
  payloads are read either.
- `HashingFileSystemWriter` is DCP's file writer that records the SHA-256 of
  every file as it writes it, so a commit never reads a checkpoint back.
- `chunk_slots` / `slot_view`: one rank's planned chunks laid out in one flat
  host buffer, reused across saves; the disk writer (its buffer shared with
  the writer process) and the memory tier (`ShardBuffer`) both stage so.
- `read_tensors` / `write_tensors`: single-process access for tools (inspect,
  export, import).
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.futures import Future

from atoll.checkpoint.manifest import CheckpointError

_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # No dotted names: `module.attr.attr` could reach anything a module imports.
        if "." not in name:
            if module in _ALLOWED_MODULES:
                found = super().find_class(module, name)
                if isinstance(found, type) and found.__module__ == module:
                    return found  # a class DCP defines for its metadata
            elif (module, name) in _ALLOWED_GLOBALS:
                return super().find_class(module, name)
            elif module == "torch" and isinstance(getattr(torch, name, None),
                                                  (torch.dtype, torch.layout, torch.memory_format)):
                return getattr(torch, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


def safe_unpickle(blob: bytes) -> Any:
    """Unpickle DCP metadata (alone or inside plain dicts, lists and numbers) with the allow-list."""
    return _MetadataUnpickler(io.BytesIO(blob)).load()


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, but `.metadata` is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = safe_unpickle(stream.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def nest_by_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": {...}, "optim": {...}}: DCP flattens it back to the same dotted names,
    but does its per-key bookkeeping for two keys instead of hundreds."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        head, _, rest = name.partition(".")
        nested.setdefault(head, {})[rest] = tensor
    return nested


def one_line_error(exc: BaseException) -> str:
    """A failed save in one line; DCP's CheckpointException carries each rank's exception
    and traceback, and the first rank's exception is the story."""
    failures = getattr(exc, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
    if failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"rank {rank}: {type(inner).__name__}: {inner}".splitlines()[0]
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


# ---------------------------------------------------------------- writing files

FileHashes = dict[str, tuple[int, str]]  # file name -> (size, SHA-256)


_HASH_ASIDE_FROM = 1 << 20  # bytes: smaller writes (record headers) are copied for later hashing


class _HashingStream:
    """A binary file that hashes what is written to it and is fsynced when closed.

    Without `stable` every write is hashed before it returns. With `stable`
    (start address, length) of memory that does not change during the save,
    large writes from inside it are hashed later, from that memory (anything
    else is copied, since its writer may reuse the buffer): on a thread that
    starts when the file is closed and runs while `close` waits for fsync,
    so the hash costs no wall time and never competes with the writes for a
    core. `finish()` waits for the hash.
    """

    def __init__(self, stream: Any, stable: Optional[tuple[int, int]] = None):
        self.stream, self.stable = stream, stable
        self.digest = hashlib.sha256()
        self.size = 0
        self._later: list = []
        self._thread: Optional[threading.Thread] = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if self.stable is None:
            self.digest.update(view)
        else:
            self._later.append(view if self._inside_stable(view) else bytes(view))
        return self.stream.write(view)

    def _inside_stable(self, view: memoryview) -> bool:
        if view.nbytes < _HASH_ASIDE_FROM:
            return False
        start = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
        return self.stable[0] <= start and start + view.nbytes <= self.stable[0] + self.stable[1]

    def _hash_later(self) -> None:
        for chunk in self._later:
            self.digest.update(chunk)  # hashlib drops the GIL on large buffers
        self._later = []

    def close(self) -> None:
        if self.stream.closed:
            return
        if self._later:
            self._thread = threading.Thread(target=self._hash_later, name="atoll-ckpt-hash", daemon=True)
            self._thread.start()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        if hasattr(os, "posix_fadvise"):
            # Written, synced and hashed from memory: nothing reads these pages again
            # soon, and left in the page cache they would push out what training uses.
            os.posix_fadvise(self.stream.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self.stream.close()

    def finish(self) -> str:
        self.close()
        if self._thread is not None:
            self._thread.join()
        return self.digest.hexdigest()

    def tell(self) -> int:
        return self.stream.tell()

    def fileno(self) -> int:
        return self.stream.fileno()

    def flush(self) -> None:
        self.stream.flush()

    def writable(self) -> bool:
        return True


class _HashingFileSystem(FileSystem):
    """DCP's local file system; every file it writes is hashed on the way out and fsynced
    when closed."""

    def __init__(self, stable: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.stable = stable
        self.hashes: FileHashes = {}

    @contextmanager
    def create_stream(self, path: Any, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if mode != "wb":
                yield stream
                return
            hashing = _HashingStream(stream, self.stable)
            try:
                yield hashing
            finally:
                digest = hashing.finish()
        self.hashes[Path(path).name] = (hashing.size, digest)


class HashingFileSystemWriter(FileSystemWriter):
    """DCP's file writer (one file per rank, fsynced before the save counts as written) that
    also records each file's size and SHA-256 as it writes it (`hashes`, by file name): the
    manifest takes them from there instead of reading the files back. `stable`: memory
    (start, length) the saved tensors live in and that stays unchanged while they are
    written; their bytes are then hashed beside the write and the fsync."""

    def __init__(self, path: Path | str, stable: Optional[tuple[int, int]] = None) -> None:
        # per_thread_copy_ahead=0: the tensors are host tensors already; no copy-ahead stage.
        # sync_files=False: the file system below fsyncs every file as it closes it.
        super().__init__(str(path), single_file_per_rank=True, sync_files=False, thread_count=1,
                         per_thread_copy_ahead=0)
        self.fs = _HashingFileSystem(stable)

    @property
    def hashes(self) -> FileHashes:
        return self.fs.hashes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        # The SHA-256 covers every byte; torch.save's own CRC32 of each record would cost
        # about a fifth of the write's CPU time for nothing. Process-wide, hence restored.
        crc32 = getattr(torch.serialization, "get_crc32_options", lambda: None)()
        if crc32:
            torch.serialization.set_crc32_options(False)
        try:
            return super().write_data(plan, planner)
        finally:
            if crc32:
                torch.serialization.set_crc32_options(True)


# ---------------------------------------------------------------- host staging

_ALIGN = 64  # every chunk starts aligned, so its byte slice can be viewed as any dtype


@dataclass(frozen=True)
class ChunkSlot:
    """Where one planned chunk sits in a rank's flat host buffer."""

    index: MetadataIndex
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def chunk_slots(items: list[WriteItem], what: str) -> tuple[list[ChunkSlot], int]:
    """Lay a plan's tensor chunks out back to back (aligned); returns the slots and the total size."""
    slots, total = [], 0
    for item in items:
        if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
            raise CheckpointError(f"{what} hold tensors only; {item.index.fqn} is not one")
        dtype = item.tensor_data.properties.dtype
        shape = tuple(item.tensor_data.chunk.sizes)
        nbytes = math.prod(shape) * dtype.itemsize
        slots.append(ChunkSlot(item.index, total, nbytes, dtype, shape))
        total += -(-nbytes // _ALIGN) * _ALIGN
    return slots, total


def slot_view(buffer: torch.Tensor, slot: ChunkSlot) -> torch.Tensor:
    """The slot's bytes of `buffer` as a tensor of the chunk's dtype and shape."""
    return buffer[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


class ShardBuffer:
    """One rank's flat host buffer, allocated on first use and reused while it is big enough."""

    def __init__(self) -> None:
        self.data = torch.empty(0, dtype=torch.uint8)

    def ensure(self, nbytes: int, pin: bool = False) -> torch.Tensor:
        if self.data.numel() < nbytes or (pin and not self.data.is_pinned()):
            self.data = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        return self.data


def read_tensors(ckpt_dir: Path, tensor_index: dict[str, dict],
                 keys: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Full tensors of a checkpoint in this process (no process group needed)."""
    wanted = keys if keys is not None else list(tensor_index)
    template = {k: torch.empty(tensor_index[k]["shape"], dtype=getattr(torch, tensor_index[k]["dtype"]))
                for k in wanted}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(template, storage_reader=SafeFileSystemReader(str(ckpt_dir)), no_dist=True)
    return template


def write_tensors(ckpt_dir: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save full tensors from this process alone (used by importers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(tensors, storage_writer=HashingFileSystemWriter(ckpt_dir), no_dist=True)


def tensor_index(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Global name → global shape and dtype (DTensor shapes are global)."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(tensors.items())}
