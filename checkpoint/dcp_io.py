"""torch.distributed.checkpoint (DCP) plumbing: safe reading, background staging.

- `SafeFileSystemReader` reads DCP's `.metadata` with an unpickler that only
  admits DCP's own metadata classes, torch sizes and dtypes: loading a
  checkpoint never runs arbitrary pickled code. atoll saves only tensors
  through DCP (non-tensor state lives in the JSON manifest), so no pickled
  payloads are read either.
- `BackgroundStager` copies a state dict into reusable shared-memory host
  buffers on a background thread. Parameters and optimizer state do not change
  between one optimizer step and the next, so the copy overlaps the next
  forward/backward and only has to be finished before the next optimizer
  step (DataStates-LLM's lazy copy); the writer process then reads the shared
  buffers without another copy.
- `read_tensors` / `write_tensors`: single-process access for tools (inspect,
  export, import).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
import pickle
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import _async_process_executor as _process_executor
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.staging import AsyncStager

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


PARENT_POLL_S = 0.5
WRITER_PARENT_ENV = "ATOLL_WRITER_PARENT"
# Set by the launcher where one store outlives several attempts (torchrun's
# agent store): the writers' keys then get a prefix per attempt, or a restarted
# writer reads the gloo addresses of a dead one and waits on it.
WRITER_STORE_PREFIX_ENV = "ATOLL_WRITER_STORE_PREFIX"
_ORIGINAL_WRITER_MAIN = _process_executor._AsyncCheckpointProcess._checkpointing_subprocess


def _die_with_parent() -> None:
    """A writer whose rank was killed (SIGKILL: no chance to stop it) must not outlive it.

    Polled, not PR_SET_PDEATHSIG: that fires when the *thread* that spawned
    the writer ends, and DCP spawns it from a short-lived thread. The parent
    names itself in WRITER_PARENT_ENV: a rank killed while its writer still
    imports torch is then noticed too (`getppid()` read that late would
    already be the reaper's).
    """
    parent = int(os.environ.get(WRITER_PARENT_ENV, os.getppid()))

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="atoll-writer-parent-watch", daemon=True).start()


def _quiet_writer_main(*args: Any) -> None:
    """The writer process's main, minus the INFO lines it logs on every save."""
    _die_with_parent()
    attempt_prefix = os.environ.get(WRITER_STORE_PREFIX_ENV, "")
    if attempt_prefix:
        _process_executor.PrefixStore = lambda prefix, store: dist.PrefixStore(prefix + attempt_prefix, store)
    _process_executor._init_logger = lambda rank: logging.getLogger().setLevel(logging.WARNING)
    # Staged DTensors arrive before the writer's own process group exists; torch warns
    # about that on every save, though the writer never looks up the mesh's groups.
    logging.getLogger("torch.distributed.device_mesh").setLevel(logging.ERROR)
    # The manifest's SHA-256 covers every byte; torch.save's own CRC32 would cost
    # the writer about a fifth of its CPU time for nothing.
    if hasattr(torch.serialization, "set_crc32_options"):
        torch.serialization.set_crc32_options(False)
    _ORIGINAL_WRITER_MAIN(*args)


def quiet_writer_process() -> None:
    """Make DCP's writer process log warnings only (it is spawned, so patch its entry)."""
    os.environ[WRITER_PARENT_ENV] = str(os.getpid())
    _process_executor._AsyncCheckpointProcess._checkpointing_subprocess = staticmethod(_quiet_writer_main)


def stop_writer_process() -> None:
    """End DCP's writer process (one per process, shared): the next async save starts a fresh one."""
    process = getattr(_process_executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        try:
            process.__del__()  # torch's own shutdown: TERMINATE request, join, then SIGTERM
        finally:
            _process_executor._CHECKPOINT_PROCESS = None


def nest_by_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": {...}, "optim": {...}}: DCP flattens it back to the same dotted names,
    but does its per-key bookkeeping for two keys instead of hundreds."""
    nested: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        head, _, rest = name.partition(".")
        nested.setdefault(head, {})[rest] = tensor
    return nested


def file_writer(path: Path) -> FileSystemWriter:
    """One file per rank, fsynced before DCP reports the save done."""
    return FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)


class BackgroundStager(AsyncStager):
    """Stage (copy to host) on a thread; buffers are allocated once and reused.

    Only one save may be in flight: the caller waits for the previous upload
    before staging again, since the writer reads these buffers.
    """

    _synchronize_after_execute = False

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atoll-ckpt-stage")
        self._buffers: Optional[dict[str, Any]] = None

    def stage(self, state_dict: dict[str, Any]) -> Future:
        return self._executor.submit(self._copy, state_dict)

    def _copy(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        if self._buffers is None or _shape_of(self._buffers) != _shape_of(state_dict):
            self._buffers = _create_cpu_state_dict(state_dict, share_memory=True)
        return _copy_state_dict(state_dict, self._buffers)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._buffers = None


def _shape_of(nested: dict[str, Any]) -> dict:
    return {k: _shape_of(v) if isinstance(v, dict) else tuple(v.shape) for k, v in nested.items()}


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
        dcp.save(tensors, storage_writer=file_writer(ckpt_dir), no_dist=True)


def tensor_index(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Global name → global shape and dtype (DTensor shapes are global)."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
            for k, v in sorted(tensors.items())}
