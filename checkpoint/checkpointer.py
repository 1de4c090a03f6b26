"""Asynchronous, layout-free checkpoints of a set of `Stateful` objects.

A save (every `checkpoint.interval` steps and at the end) goes:
1. `save(step)`: wait for the previous save if it is still in flight (at most
   one), split the states into tensors and JSON, and start a checkpoint
   thread that runs `dcp.save` on the checkpoint group: it stages this rank's
   tensors into a shared host buffer while the next forward/backward runs
   (device tensors on a side stream into the buffer page-locked: device_copy.py),
   then atoll's writer process (checkpoint/writer_process.py) writes them,
   hashing as it goes, into `step-N.partial/` outside this process's GIL.
2. `wait_staging()` before the next optimizer step: the only point where
   training must wait, since that step mutates what is being copied (on CUDA
   the loop waits until the copies are queued, its stream until they ran).
3. When every rank's files are durable (DCP's final gather), the ranks share
   their files' hashes and, on the same thread, the coordinator writes the
   manifest, renames the folder, rewrites `latest` and applies retention.

With `checkpoint.async=false` the same happens synchronously inside `save`.
Checkpoint collectives use their own gloo group, so they never interleave
with training collectives. This module knows state dicts, not models.

DiLoCo islands (`IslandSaves`) each hold state of their own (local
parameters, inner optimizer, data position): island k writes its files and
its JSON state into `step-N.partial/island-k/` with its own group, reports
them durable, and the lead of island 0 writes the one manifest (hashing
every island's files) and commits once every member island has reported.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from atoll.checkpoint.dcp_io import (FileHashes, HashingFileSystemWriter, SafeFileSystemReader,
                                    nest_by_prefix, one_line_error, tensor_index)
from atoll.checkpoint.device_copy import SideStreamCopies
from atoll.checkpoint.manifest import CheckpointError, atomic_write_text, write_manifest
from atoll.checkpoint.state import restore_states, split_state
from atoll.checkpoint.store import apply_retention, commit, partial_dir, remove_partials
from atoll.checkpoint.writer_process import AsyncFileWriter, WriterProcess

EventSink = Callable[..., None]
# On the error path, how long a save in flight may still finish before it is abandoned.
ABANDON_SAVE_AFTER_S = 60.0


ISLAND_STATE = "state.json"


def island_dir(ckpt_dir: Path, island: int) -> Path:
    return Path(ckpt_dir) / f"island-{island}"


def tensor_dir(ckpt_dir: Path, manifest: dict) -> Path:
    """Where a checkpoint's tensors are read from: island 0's folder for a DiLoCo run
    (every island holds the same names and shapes), else the checkpoint itself."""
    return island_dir(ckpt_dir, 0) if manifest.get("islands") else Path(ckpt_dir)


@dataclass
class IslandSaves:
    """How one DiLoCo island's saves join the run's checkpoint.

    `report(step)`: this island's files of `step` are durable. `wait_all(step)`:
    (island 0) until every member island reported `step`; raises past its timeout.
    """

    island: int
    islands: int
    report: Callable[[int], None]
    wait_all: Callable[[int], None]


class _InFlight:
    """One save between `save()` and its commit.

    `staged`: the live tensors may change again; `written`: this rank's files
    are durable; `done`: committed (coordinator) or handed over (others), or failed."""

    def __init__(self, step: int, started: float, tensors: dict, state: dict, samples: int):
        self.step, self.started, self.samples = step, started, samples
        self.state = state
        self.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.staged: Future = Future()
        self.written: Future = Future()
        self.done: Future = Future()
        self.thread_cpu_s = 0.0  # CPU time of its checkpoint thread (planning, staging, commit)


def _set_once(future: Future) -> None:
    if not future.done():
        future.set_result(None)


class Checkpointer:
    def __init__(self, root: Path, *, is_coordinator: bool, use_async: bool,
                 interval: int, keep: int, keep_every: int, layout: dict, recipe: dict,
                 on_event: EventSink, warn: Callable[[str], None] = print,
                 islands: Optional[IslandSaves] = None, clean_partials: Optional[bool] = None):
        self.root = Path(root)
        self.is_coordinator = is_coordinator
        self.use_async = use_async
        self.interval, self.keep, self.keep_every = interval, keep, keep_every
        self.layout, self.recipe = layout, recipe
        self.on_event, self.warn = on_event, warn
        self.islands = islands
        # Commits, retention and leftovers are the run's coordinator's: island 0's lead.
        self.commits = is_coordinator and (islands is None or islands.island == 0)
        self.group = dist.new_group(backend="gloo")
        self.writer_process = WriterProcess() if use_async else None
        if self.writer_process is not None and interval > 0:
            # Now, beside model building and resume: started at the first save, its interpreter
            # (seconds of CPU importing torch) slowed the ten steps after that save.
            self.writer_process.start()
        self.copies = SideStreamCopies()  # staging of device tensors: side stream, pinned buffer
        self.in_flight: Optional[_InFlight] = None
        self.blocked_s = 0.0  # time training waited on checkpoints since last read
        self.last_error: Optional[str] = None  # of the newest save, if it failed
        self.closed = False
        if is_coordinator:
            self.root.mkdir(parents=True, exist_ok=True)
        if self.commits if clean_partials is None else clean_partials:
            for path in remove_partials(self.root):
                warn(f"removed {path.name}: a save that never committed")

    # ------------------------------------------------------------------ saving

    def due(self, step: int, last_step: int) -> bool:
        return self.interval > 0 and (step % self.interval == 0 or step == last_step)

    def save(self, step: int, states: dict[str, Stateful], samples: int) -> None:
        start = time.perf_counter()
        self._wait_in_flight()
        tensors, json_state = split_state(states)
        save = _InFlight(step, time.time(), tensors, json_state, samples)
        target = self._target(step)
        if self.use_async:
            self.copies.begin(tensors.values())  # after the optimizer step: what the copies must see
            writer = AsyncFileWriter(target, self.writer_process, on_staged=lambda: _set_once(save.staged),
                                     copies=self.copies)
            self.in_flight = save
            # A daemon thread, not an executor: one stuck on a dead peer must not block interpreter exit.
            threading.Thread(target=self._run, args=(save, writer, nest_by_prefix(tensors)),
                             name=f"atoll-ckpt-{step}", daemon=True).start()
        else:
            self._write_and_commit(save, HashingFileSystemWriter(target), nest_by_prefix(tensors))
        self.blocked_s += time.perf_counter() - start

    def wait_staging(self) -> None:
        """Call before the optimizer step: the staged copy must be complete."""
        save = self.in_flight
        if save is not None and not save.staged.done():
            start = time.perf_counter()
            save.staged.result()
            self.blocked_s += time.perf_counter() - start
        if save is not None:
            self.copies.wait_on_loop()  # on CUDA the copies may still be queued: the GPU waits, not us

    def poll(self) -> None:
        """Report a save that has finished (committed or failed); never blocks."""
        save = self.in_flight
        if save is not None and save.done.done():
            self.in_flight = None
            if save.done.exception() is not None:
                self._failed(save, save.done.exception())

    def wait(self) -> None:
        """Until the save in flight (if any) has committed or failed."""
        self._wait_in_flight()

    def take_blocked_s(self) -> float:
        value, self.blocked_s = self.blocked_s, 0.0
        return value

    def _wait_in_flight(self, timeout: Optional[float] = None) -> None:
        save = self.in_flight
        if save is None:
            return
        try:
            save.done.result(timeout=timeout)
        except FutureTimeout:
            self.warn(f"abandoned the checkpoint of step {save.step}: a peer never finished it")
            self.in_flight = None
            return
        except BaseException as exc:  # reported; the previous committed checkpoint stays valid
            self._failed(save, exc)
            return
        self.in_flight = None

    def _run(self, save: _InFlight, writer: AsyncFileWriter, nested: dict) -> None:
        cpu = time.thread_time()
        try:
            self.copies.enter_thread()
            self._write_and_commit(save, writer, nested)
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            save.thread_cpu_s = time.thread_time() - cpu
            _set_once(save.staged)
            if not save.written.done():
                save.written.set_exception(exc)
            save.done.set_exception(exc)
        else:
            save.thread_cpu_s = time.thread_time() - cpu
            save.done.set_result(None)

    def _write_and_commit(self, save: _InFlight, writer: HashingFileSystemWriter, nested: dict) -> None:
        """Every rank writes its files; the coordinator then commits with their hashes."""
        dcp.save(nested, storage_writer=writer, process_group=self.group)
        _set_once(save.written)
        # Each rank hashed its own files as it wrote them: the commit reads none of them back.
        relative = self._target(save.step).relative_to(partial_dir(self.root, save.step))
        hashes = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(hashes, {(relative / name).as_posix(): value
                                        for name, value in writer.hashes.items()}, group=self.group)
        if self.is_coordinator:
            self._finalise(save, {name: value for rank_hashes in hashes for name, value in rank_hashes.items()})

    def _target(self, step: int) -> Path:
        target = partial_dir(self.root, step)
        return island_dir(target, self.islands.island) if self.islands else target

    def _finalise(self, save: _InFlight, hashes: FileHashes) -> None:
        target = partial_dir(self.root, save.step)
        extra = {}
        if self.islands is not None:
            atomic_write_text(self._target(save.step) / ISLAND_STATE, json.dumps(save.state, sort_keys=True))
            self.islands.report(save.step)
            if not self.commits:
                return
            self.islands.wait_all(save.step)
            extra = {"islands": self.islands.islands}
        write_manifest(target, step=save.step, samples=save.samples, layout=self.layout,
                       recipe=self.recipe, tensors=saved_tensor_index(tensor_dir(target, extra)),
                       state=save.state, extra=extra, known_hashes=hashes)
        final = commit(self.root, save.step)
        total_s = time.time() - save.started  # committed: what retention removes next is not part of the save
        self.last_error = None
        removed = apply_retention(self.root, self.keep, self.keep_every)
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        self.on_event("checkpoint_commit", step=save.step, path=str(final), bytes=size,
                      tensor_bytes=save.bytes, seconds=round(total_s, 4),
                      bytes_per_s=round(size / max(total_s, 1e-9)), removed=[p.name for p in removed])

    def _failed(self, save: _InFlight, exc: BaseException) -> None:
        self.in_flight = None
        message = f"checkpoint of step {save.step} failed: {one_line_error(exc)}"
        self.last_error = message
        self.warn(message)
        if self.commits:
            self.on_event("checkpoint_failed", step=save.step, error=message)

    def close(self, wait_for_peers: bool = True) -> None:
        """Wait for the save in flight to commit, then release threads and the writer.

        `wait_for_peers=False` is for the error path: a peer that failed will
        never reach the final barrier, and waiting for it would hang the job.
        Nor may the save in flight, whose writers wait on each other, hold it
        for longer than ABANDON_SAVE_AFTER_S: then it stays a `.partial`
        folder, never loaded and removed by the next run.
        """
        if self.closed:
            return
        self.closed = True
        self._wait_in_flight(timeout=None if wait_for_peers else ABANDON_SAVE_AFTER_S)
        if self.writer_process is not None:
            self.writer_process.stop(wait=wait_for_peers)
        if wait_for_peers:
            dist.barrier(group=self.group)

    # ------------------------------------------------------------------ loading

    def load(self, ckpt_dir: Path, manifest: dict, states: dict[str, Stateful], only: str = "") -> None:
        """Load a verified checkpoint into `states`, resharding to this layout; `only` (a name
        prefix) loads just the checkpoint's tensors under it (e.g. the model's weights)."""
        if only:
            manifest = {**manifest, "tensors": {k: v for k, v in manifest["tensors"].items() if k.startswith(only)}}
        tensors, _ = split_state(states)
        # Every rank holds part of the model (pipeline stages): check the union, the same everywhere.
        pieces = [None] * dist.get_world_size()
        dist.all_gather_object(pieces, tensor_index(tensors), group=self.group)
        check_fits(ckpt_dir, manifest, {k: v for piece in pieces for k, v in piece.items()})
        folder, state = Path(ckpt_dir), manifest["state"]
        if manifest.get("islands"):
            if self.islands is None or self.islands.islands != manifest["islands"]:
                raise CheckpointError(f"checkpoint {ckpt_dir} holds {manifest['islands']} DiLoCo islands; "
                                      f"resume it with diloco.islands={manifest['islands']}")
            folder = island_dir(ckpt_dir, self.islands.island)
            state = json.loads((folder / ISLAND_STATE).read_text(encoding="utf-8"))
        try:
            dcp.load(tensors, storage_reader=SafeFileSystemReader(str(folder)), process_group=self.group)
        except (Exception, CheckpointException) as exc:  # the latter is a BaseException
            # e.g. a tensor the manifest lists but the files lack: one line naming it, every rank
            raise CheckpointError(f"checkpoint {ckpt_dir} failed to load: {one_line_error(exc)}") from None
        restore_states(states, tensors, state)


def saved_tensor_index(ckpt_dir: Path) -> dict[str, dict]:
    """Global names, shapes and dtypes of what every rank wrote (DCP's metadata)."""
    metadata = SafeFileSystemReader(str(ckpt_dir)).read_metadata()
    return {name: {"shape": list(meta.size), "dtype": str(meta.properties.dtype).removeprefix("torch.")}
            for name, meta in sorted(metadata.state_dict_metadata.items())}


def check_fits(ckpt_dir: Path, manifest: dict, wanted: dict[str, dict]) -> None:
    """One line listing every tensor whose name or global shape differs."""
    saved = manifest["tensors"]
    problems = []
    for name in sorted(set(saved) | set(wanted)):
        if name not in saved:
            problems.append(f"{name} missing from checkpoint")
        elif name not in wanted:
            problems.append(f"{name} not in this model")
        elif saved[name]["shape"] != wanted[name]["shape"]:
            problems.append(f"{name} {saved[name]['shape']} vs {wanted[name]['shape']}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"checkpoint {ckpt_dir} does not fit this model ({len(problems)} "
                              f"mismatched tensors): {shown}")
