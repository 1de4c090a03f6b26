"""The memory tier of checkpoints: DCP snapshots held in host memory, outside the workers.

Every `checkpoint.memory_interval` steps (auto: as often as costs at most 5%
of the step time, checkpoint/snapshot_interval.py) each rank hands its shard
of the training state to a `SnapshotStore` (checkpoint/snapshot_store.py)
that outlives the worker processes: slot files in each node's /dev/shm
(under Ray answered for by a keeper actor per node). A restarted group then
resumes from state seconds old instead of from the last disk checkpoint. On
the host every tensor is copied straight into the slot the store hands out;
from a GPU into one reused pinned staging buffer on a side stream
(checkpoint/device_copy.py), which the store then takes. The loop goes on as
soon as the copies are done or queued. What to copy from where is planned at
the first snapshot and reused while the state's tensors stay in the same
memory, so a snapshot costs one copy call and no per-tensor Python.

- `MemorySnapshotter`: what the train loop calls (`save`, `wait_copied`, `wait`);
  the copies run on one long-lived thread.
- `restore_snapshot`: load a complete snapshot into a set of `Stateful`s.
- The DCP storage plugins that keep DCP's own format in a store, so a restore
  reshards to any layout exactly like `dcp.load` from files: checkpoint/memory_dcp.py.

Like the disk tier, this module knows state dicts, not models, and it never
imports Ray: a Ray store is just another `SnapshotStore` handed in.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner, Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from atoll.checkpoint.dcp_io import ShardBuffer, nest_by_prefix, one_line_error
from atoll.checkpoint.device_copy import SideStreamCopies
from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.memory_dcp import CopyPlan, MemoryReader, MemoryWriter
from atoll.checkpoint.snapshot_store import ShmSnapshotStore, SnapshotStore, default_shm_root, shm_root
from atoll.checkpoint.snapshot_interval import IntervalChoice, SnapshotTimings, interval_for
from atoll.checkpoint.state import restore_states, split_state

__all__ = ["SnapshotStore", "ShmSnapshotStore", "shm_root", "default_shm_root", "ShardBuffer", "MemoryWriter",
           "MemoryReader", "MemorySnapshotter", "restore_snapshot"]

# Memory copies take well under a second; a snapshot still running after this waits on a dead peer.
ABANDON_SNAPSHOT_AFTER_S = 30.0


# ---------------------------------------------------------------- train-loop API

def _structure(flat: dict[str, Any]) -> tuple:
    """What decides DCP's plan for a flattened state dict: names, global and local shapes, dtypes."""
    key = []
    for fqn, value in sorted(flat.items()):
        local = value.to_local() if isinstance(value, DTensor) else value
        key.append((fqn, type(value).__name__, tuple(value.shape), tuple(local.shape), str(value.dtype))
                   if isinstance(value, torch.Tensor) else (fqn, type(value).__name__))
    return tuple(key)


def storage_key(tensors: dict[str, torch.Tensor]) -> tuple:
    """Where the state's tensors live: names, kinds, global shapes and each local tensor's
    memory (address, shape, strides, dtype). While it holds, a copy plan resolved from
    these tensors reads exactly them; a restore that replaces a tensor, or moves one into
    new memory, changes it. Cheap enough for every step (no DTensor calls)."""
    key = []
    for name, value in tensors.items():
        local = getattr(value, "_local_tensor", value)  # a DTensor's shard, without to_local()
        key.append((name, type(value), tuple(value.shape), local.data_ptr(), tuple(local.shape),
                    local.stride(), local.storage_offset(), local.dtype, local.device))
    return tuple(key)


@dataclass
class SavedLayout:
    """One rank's plan from a full `dcp.save`: reused while the state keeps its structure.

    DCP plans every save from scratch: object collectives of the local and
    global plans and of the metadata, tens of milliseconds of Python at every
    step. A snapshot of a state with the same names, shapes and dtypes gets
    the same plan, so after the first one each rank copies its chunks to the
    offsets it used then; the coordinator stores the same Metadata with the
    new JSON state. While the tensors also stay where they are (`storage`),
    the copy plan is reused too, and a snapshot is one copy into the staging
    buffer and one piece for the store, with no per-tensor Python work.
    """

    structure: tuple
    layout: list  # (WriteItem, offset, nbytes) of this rank's chunks
    total: int
    metadata: Optional[Metadata]  # the coordinator's; None elsewhere
    world: int
    storage: tuple = ()  # storage_key of the tensors `copies` reads
    copies: Optional[CopyPlan] = None
    pickled_metadata: Optional[bytes] = None  # the coordinator's, once stored


@dataclass
class _Job:
    name: str
    done: threading.Event = field(default_factory=threading.Event)


class _Runner:
    """One daemon thread that runs the snapshots one after another: starting a thread per
    snapshot would make the loop wait for the new thread to take the GIL. A daemon, not an
    executor: one stuck on a dead peer must not block interpreter exit."""

    def __init__(self, name: str):
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, name: str, fn: Callable, *args) -> _Job:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()
        job = _Job(name)
        self._jobs.put((job, fn, args))
        return job

    def _loop(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, fn, args = item
            try:
                fn(*args)
            finally:
                job.done.set()

    def stop(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None


class MemorySnapshotter:
    """Snapshots of the training state into a store every `interval` steps, one in flight.

    After the optimizer step of a due step the loop calls `save`; the store
    copies the state on a thread during the next forward/backward, and
    `wait_copied` before the next optimizer step is the only wait. Snapshot collectives use their own gloo group, so they never
    interleave with training or disk-checkpoint collectives. Failures are
    reported (`last_error`, `warn`, a `snapshot_failed` event), never raised:
    the previous complete snapshot stays valid.

    `interval=None` is `checkpoint.memory_interval: auto`: a snapshot at every
    step until `choose_interval` has measured enough of them to pick the
    interval, the same on every rank (and, through `agree_interval`, on every
    DiLoCo island: it takes this island's choice and returns the run's).
    """

    def __init__(self, store: SnapshotStore, *, rank: int, world: int, is_coordinator: bool,
                 interval: Optional[int], on_event: Optional[Callable[..., None]] = None,
                 warn: Callable[[str], None] = print,
                 agree_interval: Optional[Callable[[int], int]] = None):
        self.store, self.rank, self.world = store, rank, world
        self.is_coordinator, self.interval = is_coordinator, interval
        self.on_event, self.warn, self.agree_interval = on_event, warn, agree_interval
        self.group = dist.new_group(backend="gloo")
        # Shards are keyed by rank and a step is complete with ranks 0..world-1: they must be this group's.
        if (rank, world) != (dist.get_rank(self.group), dist.get_world_size(self.group)):
            raise ValueError(f"snapshot rank {rank} of {world} is rank {dist.get_rank(self.group)} of "
                             f"{dist.get_world_size(self.group)} in torch.distributed")
        self.buffer = ShardBuffer()  # staging, reused from snapshot to snapshot
        self.copies = SideStreamCopies()
        self.timings = SnapshotTimings()  # of the first snapshots, while the interval is auto
        self.last_error: Optional[str] = None  # of the newest snapshot, if it failed
        self.last_step: Optional[int] = None  # newest snapshot this rank finished storing
        self.blocked_s = 0.0  # time training waited on snapshots since last read
        self.waited_s = 0.0  # the same, never reset
        self.closed = False
        self._runner = _Runner("atoll-snapshots")
        self._in_flight: Optional[_Job] = None
        self._copied = threading.Event()
        self._copied.set()
        self._saved: Optional[SavedLayout] = None

    def due(self, step: int) -> bool:
        if self.interval is None:  # auto, still measuring: the first steps are snapshotted
            return True
        return self.interval > 0 and step % self.interval == 0

    def save(self, step: int, states: dict[str, Stateful], extra: dict) -> None:
        """Start the snapshot of `step` (after the previous one finished); `extra` must be JSON."""
        start = time.perf_counter()
        number = self.timings.saved(start, self.waited_s) if self.interval is None else 0
        self.wait()  # counts its own wait
        start = time.perf_counter()
        json.dumps(extra)  # a TypeError now, rather than an unreadable snapshot at restore
        tensors, json_state = split_state(states)
        storage = storage_key(tensors)
        self.copies.begin(tensors.values())  # after the optimizer step: what the copies must see
        self._copied = threading.Event()
        writer = MemoryWriter(self.store, step, rank=self.rank, buffer=self.buffer, copied=self._copied,
                              extra={"state": json_state, "extra": extra}, copies=self.copies)
        self._in_flight = self._runner.submit(f"snapshot of step {step}", self._run,
                                              step, writer, tensors, storage, number)
        self._waited(time.perf_counter() - start)

    def wait_copied(self) -> None:
        """Call before the next optimizer step: every tensor of the snapshot is in the buffer
        (on CUDA: queued there, and what the loop queues next runs after it)."""
        if not self._copied.is_set():
            start = time.perf_counter()
            self._copied.wait()
            self._waited(time.perf_counter() - start)
        self.copies.wait_on_loop()

    def choose_interval(self) -> Optional[IntervalChoice]:
        """`auto`: once the first snapshots are measured, fix the interval; None before and after.

        Every rank calls it after every step: at the same step on all of them it
        waits for the last measured snapshot and takes the worst cost and the
        shortest step over the snapshot group (a collective), so all choose alike."""
        if self.interval is not None or not self.timings.complete:
            return None
        self.timings.end_step(time.perf_counter(), self.waited_s)
        self.wait()  # its copy time is known, and the group is free for the reduction
        snapshot_s, step_s = self.timings.estimate()
        worst = torch.tensor([snapshot_s, -step_s], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=self.group)
        snapshot_s, step_s = float(worst[0]), -float(worst[1])
        interval = interval_for(snapshot_s, step_s)
        if self.agree_interval is not None:
            interval = self.agree_interval(interval)
        self.interval = interval
        return IntervalChoice(interval, snapshot_s, step_s)

    def _waited(self, seconds: float) -> None:
        self.blocked_s += seconds
        self.waited_s += seconds

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Until the snapshot in flight is stored (and complete, on the coordinator).

        False if it is still running after `timeout` or the newest one failed."""
        job = self._in_flight
        if job is not None:
            start = time.perf_counter()
            job.done.wait(timeout)
            self._waited(time.perf_counter() - start)
            if not job.done.is_set():
                return False
            self._in_flight = None
        return self.last_error is None

    def take_blocked_s(self) -> float:
        value, self.blocked_s = self.blocked_s, 0.0
        return value

    def _run(self, step: int, writer: MemoryWriter, tensors: dict, storage: tuple, number: int) -> None:
        started = time.perf_counter()
        try:
            self.copies.enter_thread()
            if not self._save_as_before(writer, tensors, storage):
                dcp.save(nest_by_prefix(tensors), storage_writer=writer, process_group=self.group)
                self._saved = SavedLayout(_structure(tensors), writer.layout, writer.total, writer.metadata,
                                          dist.get_world_size(self.group), storage, writer.copy_plan)
            if writer.is_coordinator:  # it wrote the meta: the step is complete, older ones are not needed
                self.store.retain(step)
            self.last_step, self.last_error = step, None
            if number:
                self.timings.copied(number, writer.copy_s)
            if self.is_coordinator and self.on_event is not None:
                self.on_event("memory_snapshot", step=step, shard_bytes=self._saved.total,
                              seconds=round(time.perf_counter() - started, 4))
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            self.last_error = f"memory snapshot of step {step} failed: {one_line_error(exc)}"
            self.warn(self.last_error)
            if self.is_coordinator and self.on_event is not None:
                self.on_event("snapshot_failed", step=step, error=self.last_error)
        finally:
            writer.copied.set()  # nothing more will be copied: wait_copied must not hang

    def _save_as_before(self, writer: MemoryWriter, tensors: dict, storage: tuple) -> bool:
        """Store the snapshot with the previous save's plan, if every rank's state kept its
        structure; False (nothing stored) when one did not and a full `dcp.save` is needed.

        Where every rank's tensors also kept their storage, the previous copy plan is reused
        as it is; otherwise it is resolved again from the same layout."""
        saved = self._saved
        # 2: same storage (copy plan reusable), 1: same structure, 0: plan again. One collective.
        if saved is None:
            same_as_before = 0
        elif saved.storage == storage and saved.copies is not None:
            same_as_before = 2
        else:
            same_as_before = int(saved.structure == _structure(tensors))
        same = torch.tensor([same_as_before])
        dist.all_reduce(same, op=dist.ReduceOp.MIN, group=self.group)
        if not same.item():
            return False
        failure: Optional[BaseException] = None
        try:
            if same.item() == 2:
                writer.write_shard(saved.copies)
            else:
                planner = DefaultSavePlanner()
                planner.set_up_planner(nest_by_prefix(tensors), is_coordinator=self.is_coordinator)
                saved.copies = writer.plan_copies(saved.layout, saved.total, planner)
                saved.storage = storage
                writer.write_shard(saved.copies)
        except Exception as exc:  # every rank must still reach the collective below
            failure = exc
        failed = torch.tensor([int(failure is not None)])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=self.group)
        if failure is not None:
            raise failure
        if failed.item():
            raise CheckpointError(f"memory snapshot of step {writer.step}: a peer could not store its shard")
        if saved.metadata is not None:  # the coordinator: every shard is stored
            writer.is_coordinator = True
            saved.pickled_metadata = writer.put_meta(saved.metadata, saved.world, saved.pickled_metadata)
        return True

    def close(self, wait_for_peers: bool = True) -> None:
        """Wait for the snapshot in flight and join its thread.

        `wait_for_peers=False` is the error path: no collectives, and a
        snapshot still waiting on a dead peer after ABANDON_SNAPSHOT_AFTER_S is
        left behind (incomplete, so never restored)."""
        if self.closed:
            return
        self.closed = True
        self.wait(timeout=None if wait_for_peers else ABANDON_SNAPSHOT_AFTER_S)
        if self._in_flight is not None:
            self.warn(f"abandoned the memory snapshot in flight ({self._in_flight.name}): a peer never finished it")
        else:
            self._runner.stop()
        if wait_for_peers:
            dist.barrier(group=self.group)


def restore_snapshot(store: SnapshotStore, step: int, states: dict[str, Stateful],
                     process_group: Optional[dist.ProcessGroup] = None) -> dict:
    """Load the complete snapshot of `step` into `states`, resharding to this layout; returns its `extra`.

    Every rank of `process_group` calls it with the same step; without a
    process group and outside torch.distributed it loads in this process alone.
    """
    problem = store.missing(step)
    if problem is not None:
        raise CheckpointError(f"memory snapshot of step {step} is not complete: {problem}")
    reader = MemoryReader(store, step)
    tensors, _ = split_state(states)
    _check_fits(step, reader.metadata, tensors)
    no_dist = process_group is None and not dist.is_initialized()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=reader, process_group=process_group, no_dist=no_dist)
    except CheckpointException as exc:  # one rank's error, re-raised on every rank with tracebacks
        raise CheckpointError(f"memory snapshot of step {step} failed to load: {one_line_error(exc)}") from None
    restore_states(states, tensors, reader.extra.get("state", {}))
    return reader.extra.get("extra", {})


def _check_fits(step: int, metadata: Metadata, tensors: dict[str, torch.Tensor]) -> None:
    saved = metadata.state_dict_metadata
    problems = [f"{name} missing" if name not in saved else f"{name} {list(saved[name].size)} vs {list(t.shape)}"
                for name, t in sorted(tensors.items())
                if name not in saved or list(saved[name].size) != list(t.shape)]
    if problems:
        raise CheckpointError(f"memory snapshot of step {step} does not fit this model ({len(problems)} "
                              f"mismatched tensors): {'; '.join(problems[:8])}")
