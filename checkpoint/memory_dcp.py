"""The memory tier's DCP storage plugins: a snapshot in DCP's own format, held by a store.

`MemoryWriter` writes one rank's chunks into a store (one staging copy, or straight into
memory the store hands out) and the coordinator's Metadata last; `MemoryReader` reads a
stored snapshot back for `dcp.load`, so a restore reshards to any layout exactly like
loading files. `CopyPlan` is what a writer copies from where. checkpoint/snapshot.py
drives them from the train loop; like it, this module knows state dicts, not models,
and never imports Ray.
"""

from __future__ import annotations

import pickle
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.distributed.checkpoint import Metadata, StorageReader, StorageWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from atoll.checkpoint.dcp_io import ShardBuffer, chunk_slots, safe_unpickle
from atoll.checkpoint.device_copy import SideStreamCopies
from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot_store import Buffer, Shard, SnapshotStore


@dataclass
class CopyPlan:
    """One rank's snapshot copies: each chunk's live source tensor and its view in the
    staging buffer, resolved once and reused while the state keeps its storage."""

    sources: list[torch.Tensor]
    targets: list[torch.Tensor]
    staging: torch.Tensor  # the `total` bytes the targets lie in, handed to the store as one piece
    total: int
    # The same views in memory a store handed out (its slots), by that memory's address.
    elsewhere: dict = field(default_factory=dict)

    def targets_in(self, buffer: np.ndarray) -> list[torch.Tensor]:
        """`targets` at the same offsets in `buffer` (a store's memory, reused: cached)."""
        key = (buffer.ctypes.data, buffer.size)
        found = self.elsewhere.get(key)
        if found is None:
            if len(self.elsewhere) >= 4:  # a store that moved its memory: forget the old views
                self.elsewhere.clear()
            flat, base = torch.from_numpy(buffer), self.staging.data_ptr()
            found = [flat[t.data_ptr() - base:t.data_ptr() - base + t.numel() * t.element_size()]
                     .view(t.dtype).view(t.shape) for t in self.targets]
            self.elsewhere[key] = found
        return found




class MemoryWriter(StorageWriter):
    """Writes one snapshot into a store: per rank one shard of raw chunk bytes, then DCP's Metadata.

    Each chunk's storage data is `(rank, offset, nbytes)` into that rank's
    shard. Every chunk is copied into one staging buffer (a copy plan resolved
    once), and `copied` is set as soon as they are all there (on CUDA: queued
    on the side stream, which the loop's stream then waits for): the live
    tensors may change again while the store takes its copy of that buffer.
    `copy_s` is how long the copies took, for `checkpoint.memory_interval: auto`.
    """

    def __init__(self, store: SnapshotStore, step: int, *, rank: int, buffer: Optional[ShardBuffer] = None,
                 copied: Optional[threading.Event] = None, extra: Optional[dict] = None,
                 copies: Optional[SideStreamCopies] = None):
        super().__init__()
        self.store, self.step, self.rank = store, step, rank
        self.buffer = buffer if buffer is not None else ShardBuffer()
        self.copied = copied if copied is not None else threading.Event()
        self.copies = copies if copies is not None else SideStreamCopies()
        self.copy_s = 0.0
        self.extra = extra if extra is not None else {}
        self.is_coordinator = False
        # What this save planned, for the next snapshots of the same state (see SavedLayout).
        self.layout: list = []
        self.total = 0
        self.metadata: Optional[Metadata] = None
        self.world = 0
        self.copy_plan: Optional[CopyPlan] = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        slots, total = chunk_slots(plan.items, "memory snapshots")
        layout = [(item, slot.offset, slot.nbytes) for item, slot in zip(plan.items, slots)]
        self.layout, self.total = layout, total
        self.write_shard(self.plan_copies(layout, total, planner))
        results = [WriteResult(index=item.index, size_in_bytes=nbytes, storage_data=(self.rank, offset, nbytes))
                   for item, offset, nbytes in layout]
        done: Future = Future()
        done.set_result(results)
        return done

    def plan_copies(self, layout: list, total: int, planner: SavePlanner) -> "CopyPlan":
        """Resolve each planned chunk once: the live tensor it is read from and its place in the
        staging buffer (pinned when the state is on a GPU)."""
        staging = self.buffer.ensure(total, pin=self.copies.on_device)
        sources, targets = [], []
        for item, offset, nbytes in layout:
            tensor = planner.resolve_data(item).detach()  # lazily: it may allocate
            if tensor.shape != item.tensor_data.chunk.sizes:
                raise CheckpointError(f"{item.index.fqn}: chunk {tuple(tensor.shape)} is not the planned "
                                      f"{tuple(item.tensor_data.chunk.sizes)}")
            sources.append(tensor)
            targets.append(staging[offset:offset + nbytes].view(item.tensor_data.properties.dtype).view(tensor.shape))
        self.copy_plan = CopyPlan(sources, targets, staging[:total], total)
        return self.copy_plan

    def write_shard(self, copy_plan: "CopyPlan") -> None:
        """Copy every chunk into the staging buffer (on a GPU: queued on the side stream), let
        the loop go on, then hand the store that one contiguous buffer."""
        copies, started = self.copies, time.perf_counter()
        # On the host, straight into the store's memory where it offers some (one copy in all).
        direct = None if copies.on_device else self.store.shard_buffer(self.step, self.rank, copy_plan.total)
        with copies.copying():
            copies.copy_all(copy_plan.targets if direct is None else copy_plan.targets_in(direct),
                            copy_plan.sources)
        queued = time.perf_counter()
        self.copied.set()  # every chunk is in the buffer (or queued, and the loop's stream waits)
        copies.wait_done()
        copied = time.perf_counter()
        if direct is None:
            self.store.put_shard(self.step, self.rank, Shard(copy_plan.total, [(0, copy_plan.staging.numpy())]))
        else:
            self.store.commit_shard(self.step, self.rank)
        # Host time without the wait for the stream, plus the stream's own copy time.
        self.copy_s = (queued - started) + copies.device_seconds() + (time.perf_counter() - copied)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        # Runs after every rank's write_data returned, i.e. after every put_shard.
        metadata.storage_data = {r.index: r.storage_data for rank_results in results for r in rank_results}
        self.metadata, self.world = metadata, len(results)
        self.put_meta(metadata, len(results))

    def put_meta(self, metadata: Metadata, world: int, pickled: Optional[bytes] = None) -> bytes:
        """Store the meta that completes the step; returns `metadata` pickled, which a later
        snapshot of the same plan passes back as `pickled` (the metadata is the bulk of it)."""
        if pickled is None:
            pickled = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        meta = pickle.dumps({"metadata": pickled, "extra": self.extra}, protocol=pickle.HIGHEST_PROTOCOL)
        self.store.put_meta(self.step, world, meta)
        return pickled

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never picked by DCP's automatic storage selection


class MemoryReader(StorageReader):
    """Reads a stored snapshot; each ReadItem is narrowed out of the chunk that holds it."""

    def __init__(self, store: SnapshotStore, step: int):
        super().__init__()
        self.store, self.step = store, step
        saved = safe_unpickle(store.get_meta(step))
        if isinstance(saved, dict) and isinstance(saved.get("metadata"), bytes):
            saved["metadata"] = safe_unpickle(saved["metadata"])
        if not isinstance(saved, dict) or not isinstance(saved.get("metadata"), Metadata):
            raise CheckpointError(f"memory snapshot of step {step} has an unreadable meta.bin")
        self.metadata: Metadata = saved["metadata"]
        self.extra: dict = saved.get("extra", {})
        self.storage_data: dict = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        self.storage_data = {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        shards: dict[int, torch.Tensor] = {}
        for request in plan.items:
            if request.type == LoadItemType.BYTE_IO:
                raise CheckpointError(f"memory snapshots hold tensors only; {request.dest_index.fqn} is not one")
            rank, offset, nbytes = self.storage_data[request.storage_index]
            if rank not in shards:
                shards[rank] = _as_uint8_tensor(self.store.get_shard(self.step, rank))
            dtype, chunk = _saved_chunk(self.metadata, request.storage_index)
            saved = shards[rank][offset:offset + nbytes].view(dtype).view(chunk.sizes)
            for dim, (start, length) in enumerate(zip(request.storage_offsets, request.lengths)):
                saved = saved.narrow(dim, start, length)
            target = planner.resolve_tensor(request).detach()
            if target.shape != saved.shape:
                raise CheckpointError(f"{request.dest_index.fqn}: snapshot chunk {tuple(saved.shape)} "
                                      f"does not fit {tuple(target.shape)}")
            target.copy_(saved)
            planner.commit_tensor(request, target)
        done: Future = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _as_uint8_tensor(data: Buffer) -> torch.Tensor:
    array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    with warnings.catch_warnings():  # "non-writable array": it is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array.reshape(-1).view(np.uint8))


def _saved_chunk(metadata: Metadata, index: MetadataIndex) -> tuple[torch.dtype, ChunkStorageMetadata]:
    tensor_meta = metadata.state_dict_metadata[index.fqn]
    chunks = tensor_meta.chunks
    if index.index is not None and index.index < len(chunks) and chunks[index.index].offsets == index.offset:
        return tensor_meta.properties.dtype, chunks[index.index]
    return tensor_meta.properties.dtype, next(c for c in chunks if c.offsets == index.offset)
