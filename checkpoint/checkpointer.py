"""Asynchronous, layout-free checkpoints of a set of `Stateful` objects.

A save (every `checkpoint.interval` steps and at the end) goes:
1. `save(step)`: wait for the previous save if it is still in flight (at most
   one), split the states into tensors and JSON, and hand the tensors to
   `dcp.async_save`: a background thread stages them into shared host
   buffers while the next forward/backward runs, then a writer process
   persists them (outside this process's GIL) into `step-N.partial/`.
2. `wait_staging()` before the next optimizer step: the only point where
   training must wait, since that step mutates what is being copied.
3. When the writer is done on every rank (DCP's final gather), the
   coordinator hashes the files, writes the manifest, renames the folder and
   rewrites `latest` on a finaliser thread, then applies retention.

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
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
from torch.distributed.checkpoint.stateful import Stateful

from atoll.checkpoint.dcp_io import (BackgroundStager, SafeFileSystemReader, file_writer,
                                    nest_by_prefix, quiet_writer_process, stop_writer_process,
                                    tensor_index)
from atoll.checkpoint.manifest import CheckpointError, atomic_write_text, write_manifest
from atoll.checkpoint.state import restore_states, split_state
from atoll.checkpoint.store import apply_retention, commit, partial_dir, remove_partials

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
    """One save between `save()` and its commit."""

    def __init__(self, step: int, started: float, tensors: dict, state: dict, samples: int):
        self.step, self.started, self.samples = step, started, samples
        self.state = state
        self.bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.staged: Optional[Future] = None
        self.uploaded: Optional[Future] = None
        self.finalized: Optional[Future] = None


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
        self.stager = BackgroundStager() if use_async else None
        if use_async:
            quiet_writer_process()
        self.finaliser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="atoll-ckpt-commit")
        self.finaliser_closed = False
        self.in_flight: Optional[_InFlight] = None
        self.blocked_s = 0.0  # time training waited on checkpoints since last read
        self.last_error: Optional[str] = None  # of the newest save, if it failed
        self.closed = False
        self._lock = threading.Lock()
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
        writer = file_writer(target)
        if self.use_async:
            response = dcp.async_save(nest_by_prefix(tensors), storage_writer=writer, process_group=self.group,
                                      async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                                      async_stager=self.stager)
            save.staged, save.uploaded = response.staging_completion, response.upload_completion
            self.in_flight = save
            # The commit starts as soon as the writer is done, not at the next step's poll().
            # A weak reference: DCP may keep the future (and so its callbacks) after this run.
            this = weakref.ref(self)
            save.uploaded.add_done_callback(
                lambda _future, save=save: this() is not None and this()._start_commit(save))
        else:
            dcp.save(nest_by_prefix(tensors), storage_writer=writer, process_group=self.group)
            if self.is_coordinator:
                self._finalise(save)
        self.blocked_s += time.perf_counter() - start

    def wait_staging(self) -> None:
        """Call before the optimizer step: the staged copy must be complete."""
        save = self.in_flight
        if save is not None and save.staged is not None and not save.staged.done():
            start = time.perf_counter()
            save.staged.result()
            self.blocked_s += time.perf_counter() - start

    def poll(self) -> None:
        """Start the commit of a save whose files are all written; never blocks."""
        save = self.in_flight
        if save is None or not save.uploaded.done():
            return
        if save.uploaded.exception() is not None:
            self._failed(save, save.uploaded.exception())
            return
        self._start_commit(save)
        if not self.is_coordinator or save.finalized.done():
            if save.finalized is not None and save.finalized.exception() is not None:
                self._failed(save, save.finalized.exception())
            self.in_flight = None

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
            save.staged.result(timeout=timeout)
            save.uploaded.result(timeout=timeout)
        except Exception as exc:  # reported; the previous committed checkpoint stays valid
            self._failed(save, exc)
            return
        if self.is_coordinator:
            self._start_commit(save)
            try:
                save.finalized.result()
            except Exception as exc:
                self._failed(save, exc)
                return
        self.in_flight = None

    def _start_commit(self, save: _InFlight) -> None:
        """The coordinator commits a save whose files are all written (once; from the writer's
        completion callback or from the training thread, whichever comes first)."""
        with self._lock:
            if self.is_coordinator and save.finalized is None and save.uploaded.done() \
                    and save.uploaded.exception() is None and not self.finaliser_closed:
                save.finalized = self.finaliser.submit(self._finalise, save)

    def _target(self, step: int) -> Path:
        target = partial_dir(self.root, step)
        return island_dir(target, self.islands.island) if self.islands else target

    def _finalise(self, save: _InFlight) -> None:
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
                       state=save.state, extra=extra)
        final = commit(self.root, save.step)
        self.last_error = None
        removed = apply_retention(self.root, self.keep, self.keep_every)
        total_s = time.time() - save.started
        size = sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        self.on_event("checkpoint_commit", step=save.step, path=str(final), bytes=size,
                      tensor_bytes=save.bytes, seconds=round(total_s, 4),
                      bytes_per_s=round(size / max(total_s, 1e-9)), removed=[p.name for p in removed])

    def _failed(self, save: _InFlight, exc: BaseException) -> None:
        self.in_flight = None
        message = f"checkpoint of step {save.step} failed: {type(exc).__name__}: {exc}"
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
        if self.stager is not None:
            self.stager.close()
            stop_writer_process()
        with self._lock:
            self.finaliser_closed = True
        self.finaliser.shutdown(wait=True)
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
        dcp.load(tensors, storage_reader=SafeFileSystemReader(str(folder)), process_group=self.group)
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
