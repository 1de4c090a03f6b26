"""Where memory snapshots live: the `SnapshotStore` interface and its /dev/shm implementation.

A snapshot of step N is one shard of bytes per rank plus a meta blob that
the coordinator puts last; only then is the step complete. The bytes are
opaque here (checkpoint/snapshot.py writes DCP's format into them), so a
store knows neither models nor state dicts. It never imports Ray: the Ray
store (keeper actors, replicas) lives in launch/ and implements the same interface.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import mmap
import os
import re
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from atoll.checkpoint.manifest import CheckpointError

Buffer = Union[np.ndarray, bytes, memoryview]


@dataclass
class Shard:
    """One rank's bytes as pieces at their offsets: views of the live tensors (or of a
    staging buffer for tensors that need a copy first), so a store copies each byte once."""

    nbytes: int
    pieces: list[tuple[int, np.ndarray]]  # (offset, 1-D uint8)

    @classmethod
    def of(cls, data: Union["Shard", np.ndarray]) -> "Shard":
        return data if isinstance(data, Shard) else cls(data.size, [(0, data)])

    def contiguous(self) -> np.ndarray:
        out = np.zeros(self.nbytes, dtype=np.uint8)
        for offset, piece in self.pieces:
            out[offset:offset + piece.size] = piece
        return out


class SnapshotStore(abc.ABC):
    """Where memory snapshots live, outside the worker processes.

    A step is complete once `put_meta` was called for it and all `world` of
    its shards are stored; only complete steps are restored. The launcher
    pickles an instance into every training process, so implementations hold
    addresses (paths, actor handles), never open files or sockets.
    """

    @abc.abstractmethod
    def put_shard(self, step: int, rank: int, data: Union[Shard, np.ndarray]) -> None:
        """Store one rank's shard (a `Shard`, or one 1-D uint8 array); return once stored,
        keeping no reference to `data`: its pieces may be live tensors that change next."""

    def shard_buffer(self, step: int, rank: int, nbytes: int) -> Optional[np.ndarray]:
        """Where this rank may write its shard of `step` itself (1-D uint8, `nbytes` long), to
        be followed by `commit_shard`; None when the store only takes shards by `put_shard`."""
        return None

    def commit_shard(self, step: int, rank: int) -> None:
        """The shard written into `shard_buffer(step, rank, ...)` is complete."""
        raise NotImplementedError(f"{type(self).__name__} hands out no shard buffers")

    @abc.abstractmethod
    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        """Called by the coordinator once all shards of `step` are stored: the step is complete."""

    @abc.abstractmethod
    def get_shard(self, step: int, rank: int) -> Buffer:
        """The shard's bytes (read-only is fine); CheckpointError if it is not stored."""

    @abc.abstractmethod
    def get_meta(self, step: int) -> bytes:
        """The coordinator's meta; CheckpointError if it is not stored."""

    @abc.abstractmethod
    def steps(self) -> list[int]:
        """Every step with anything stored, complete or not."""

    @abc.abstractmethod
    def missing(self, step: int) -> Optional[str]:
        """None when `step` is complete, else a short phrase saying what it lacks."""

    @abc.abstractmethod
    def retain(self, step: int) -> None:
        """Drop every step older than `step`."""

    @abc.abstractmethod
    def drop(self, step: int) -> None:
        """Drop one step, complete or not."""

    @abc.abstractmethod
    def clear(self) -> None:
        """Drop everything (end of the run: a run leaves no shared memory behind)."""

    def complete(self) -> list[int]:
        """Every complete step, oldest first."""
        return [step for step in self.steps() if self.missing(step) is None]

    def latest(self) -> Optional[int]:
        """The newest complete step, or None."""
        for step in sorted(self.steps(), reverse=True):
            if self.missing(step) is None:
                return step
        return None

    def close(self) -> None:
        """Release this process's handles; the snapshots stay for the others."""


_ROOT_PREFIX = "atoll-snapshots-"


def shm_root(run_dir: str, run_id: str = "none") -> Path:
    """`/dev/shm/atoll-snapshots-<uid>-<hash of run_dir>.<run_id>`: one folder per run and job.

    Every process of the job on this node computes the same folder without
    talking, and so do torchrun's restarts of them (same run id), which is
    what lets a restart resume from memory.
    """
    return _root_for(str(Path(run_dir).resolve()), run_id)


def default_shm_root() -> Path:
    """The folder of this torchrun job when nobody names the run: keyed by MASTER_ADDR:MASTER_PORT."""
    job = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', os.getpid())}"
    return _root_for(job, os.environ.get("TORCHELASTIC_RUN_ID", "none"))


def _root_for(key: str, run_id: str) -> Path:
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"{_ROOT_PREFIX}{os.getuid()}-{digest}.{re.sub(r'[^A-Za-z0-9_]', '_', run_id)}"


_STEP_DIR = re.compile(r"^step-(\d+)$")
_SHARD_FILE = re.compile(r"^rank-(\d+)\.bin$")
_META_FILE = "meta.bin"
_SLOT_FILE = re.compile(r"^rank-(\d+)\.slot(\d)$")
_WORLD_HEADER = struct.Struct("<Q")  # meta.bin starts with the world size it completes
# A slot file: this header in its first page (so the payload's mapping is page-aligned), then the bytes.
_SLOT_HEADER = struct.Struct("<8sqQB")  # magic, step (-1: none), payload bytes, 1 once complete
_SLOT_MAGIC = b"ATOLLSLT"
_PAGE = mmap.PAGESIZE
SLOTS = 3


@dataclass
class _Slot:
    path: Path
    step: int  # -1: holds nothing
    nbytes: int
    done: bool


class ShmSnapshotStore(SnapshotStore):
    """Snapshots of the processes of one node, in `root`.

    A step's `step-<N>/meta.bin`, written by the coordinator, completes it.
    A rank's shard is either
    - in a slot it reuses (`shard_buffer`, then `commit_shard`): each rank owns
      SLOTS files `rank-<R>.slot<i>` (a header page, then the bytes) and copies
      its state straight into the mapping of one, with no other copy, file
      creation or page allocation once they exist. It writes into the slot
      holding the oldest step, so its two newest shards stay intact: the newest
      complete step is always one of them (a snapshot starts only after every
      rank stored the previous one). A slot holding a step at or past the one
      being written is left from a history the run abandoned (a restart from
      an older step) and is free;
    - or a file `step-<N>/rank-<R>.bin` (`put_shard`), written under a temp
      name and renamed. This takes any shard, and is what a store shared by
      several DiLoCo islands (whose ranks share numbers) and a subclass that
      overrides `put_shard` use (`shard_buffer` is then None).
    No fsync: the memory tier has to survive a process, not the machine.
    """

    def __init__(self, root: Optional[Path] = None):
        self.root = Path(root) if root is not None else default_shm_root()
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}  # this process's mappings of its slots
        self._writing: dict[tuple[int, int], Path] = {}  # (step, rank) -> the slot being filled

    def __getstate__(self) -> dict:  # pickled into every training process: addresses only
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"])

    def _step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    # ------------------------------------------------------------- writing

    def shard_buffer(self, step: int, rank: int, nbytes: int) -> Optional[np.ndarray]:
        if type(self).put_shard is not ShmSnapshotStore.put_shard:
            return None
        slots = self._slots_of(rank)
        # Free: nothing in it, or a step of an abandoned history; else the oldest.
        slot = min(slots, key=lambda s: -1 if s.step < 0 or s.step >= step else s.step)
        for other in slots:  # no two slots may claim one step
            if other is not slot and other.step >= step:
                _clear_slot(other.path)
        # All of them mapped at once: the first snapshot pays for their memory.
        mappings = {other.path: self._mapping(other.path, _PAGE + max(nbytes, 1)) for other in slots}
        mapping = mappings[slot.path]
        mapping[:_SLOT_HEADER.size] = _SLOT_HEADER.pack(_SLOT_MAGIC, step, nbytes, 0)
        self._writing[(step, rank)] = slot.path
        return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=_PAGE)

    def commit_shard(self, step: int, rank: int) -> None:
        mapping, _ = self._maps[self._writing.pop((step, rank))]
        nbytes = _SLOT_HEADER.unpack(mapping[:_SLOT_HEADER.size])[2]
        mapping[:_SLOT_HEADER.size] = _SLOT_HEADER.pack(_SLOT_MAGIC, step, nbytes, 1)

    def put_shard(self, step: int, rank: int, data: Union[Shard, np.ndarray]) -> None:
        shard = Shard.of(data)
        _write_atomically(self._step_dir(step) / f"rank-{rank}.bin",
                          *[(offset, memoryview(piece)) for offset, piece in shard.pieces], size=shard.nbytes)

    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        header = _WORLD_HEADER.pack(world)
        _write_atomically(self._step_dir(step) / _META_FILE, (0, header), (len(header), meta))

    def _mapping(self, path: Path, size: int) -> mmap.mmap:
        """This process's shared mapping of a slot file of at least `size` bytes (kept)."""
        held = self._maps.get(path)
        if held is not None and held[1] >= size:
            return held[0]
        if held is not None:
            with contextlib.suppress(BufferError):  # a view still exported keeps it open
                held[0].close()
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            # Its pages allocated and mapped now, not by the first copy into it.
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self._maps[path] = (mapping, size)
        return mapping

    # ------------------------------------------------------------- reading

    def _slots_of(self, rank: int) -> list[_Slot]:
        paths = [self.root / f"rank-{rank}.slot{i}" for i in range(SLOTS)]
        return [_read_slot(path) or _Slot(path, -1, 0, False) for path in paths]

    def _listing(self) -> tuple[list[int], list[tuple[int, _Slot]]]:
        """(step folders, (rank, slot) of every slot file) in root."""
        try:
            names = [p.name for p in self.root.iterdir()]
        except FileNotFoundError:
            return [], []
        folders = sorted(int(m.group(1)) for name in names if (m := _STEP_DIR.match(name)))
        slots = [(int(m.group(1)), slot) for name in names if (m := _SLOT_FILE.match(name))
                 and (slot := _read_slot(self.root / name)) is not None]
        return folders, slots

    def get_shard(self, step: int, rank: int) -> np.ndarray:
        path = self._step_dir(step) / f"rank-{rank}.bin"
        offset = 0
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            slot = next((s for s in self._slots_of(rank) if s.step == step and s.done), None)
            if slot is None:
                raise CheckpointError(f"memory snapshot of step {step} has no shard of rank {rank}") from None
            path, offset, size = slot.path, _PAGE, slot.nbytes
        if size == 0:  # a rank whose chunks were all deduplicated away; mmap refuses empty files
            return np.empty(0, dtype=np.uint8)
        # Mapped, not read: only the pages a loading rank's chunks need are touched.
        return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(size,))

    def get_meta(self, step: int) -> bytes:
        try:
            blob = (self._step_dir(step) / _META_FILE).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"memory snapshot of step {step} has no meta.bin") from None
        return blob[_WORLD_HEADER.size:]

    def holdings(self) -> dict[int, dict]:
        """step -> {"world": from its meta.bin or None, "ranks": ranks with a complete shard}.
        Slots older than the oldest step folder are what `retain` released."""
        folders, slots = self._listing()
        steps: dict[int, dict] = {}
        for step in folders:
            folder = self._step_dir(step)
            try:
                with open(folder / _META_FILE, "rb") as meta:
                    header = meta.read(_WORLD_HEADER.size)
                world = _WORLD_HEADER.unpack(header)[0] if len(header) == _WORLD_HEADER.size else None
            except FileNotFoundError:
                world = None
            try:
                ranks = [int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_FILE.match(p.name))]
            except FileNotFoundError:
                continue
            steps[step] = {"world": world, "ranks": ranks}
        floor = folders[0] if folders else -1
        for rank, slot in slots:
            if slot.done and slot.step >= floor:
                steps.setdefault(slot.step, {"world": None, "ranks": []})["ranks"].append(rank)
        return steps

    def steps(self) -> list[int]:
        return sorted(self.holdings())

    def missing(self, step: int) -> Optional[str]:
        held = self.holdings().get(step)
        if held is None:
            return "nothing stored"
        return missing_shards(held["world"], set(held["ranks"]))

    def complete(self) -> list[int]:
        return sorted(step for step, held in self.holdings().items()
                      if held["world"] is not None and set(range(held["world"])) <= set(held["ranks"]))

    def latest(self) -> Optional[int]:
        done = self.complete()
        return done[-1] if done else None

    # ------------------------------------------------------------- dropping

    def retain(self, step: int) -> None:
        # Slots stay: each is reused by its own rank, which may be writing it right now.
        for old in self._listing()[0]:
            if old < step:
                shutil.rmtree(self._step_dir(old), ignore_errors=True)

    def drop(self, step: int) -> None:
        shutil.rmtree(self._step_dir(step), ignore_errors=True)
        for _, slot in self._listing()[1]:
            if slot.step == step:  # not being written: a step dropped is not in flight
                _clear_slot(slot.path)

    def clear(self) -> None:
        self.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        for mapping, _ in self._maps.values():
            with contextlib.suppress(BufferError):  # a view still exported keeps it open
                mapping.close()
        self._maps.clear()

    @staticmethod
    def remove_stale(root: Path) -> list[Path]:
        """Remove `root` and the folders earlier jobs of the same run left (same name up to the run id).

        For the first process of a job, before any snapshot of it exists."""
        root = Path(root)
        family = root.name.split(".", 1)[0] + "."
        stale = [p for p in (root.parent.iterdir() if root.parent.is_dir() else [])
                 if p == root or (p.name.startswith(family) and p.name.startswith(_ROOT_PREFIX))]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale


def missing_shards(world: Optional[int], ranks: set) -> Optional[str]:
    """What a step with `ranks` stored and the meta's `world` (None: no meta) lacks, or None."""
    if world is None:
        return "no meta.bin" if ranks else "nothing stored"
    absent = sorted(set(range(world)) - ranks)
    return f"no shard of rank {', '.join(map(str, absent))} (of {world})" if absent else None


def _read_slot(path: Path) -> Optional[_Slot]:
    try:
        with open(path, "rb") as f:
            raw = f.read(_SLOT_HEADER.size)
    except FileNotFoundError:
        return None
    if len(raw) < _SLOT_HEADER.size:
        return _Slot(path, -1, 0, False)
    magic, step, nbytes, done = _SLOT_HEADER.unpack(raw)
    return _Slot(path, step, nbytes, bool(done)) if magic == _SLOT_MAGIC else _Slot(path, -1, 0, False)


def _clear_slot(path: Path) -> None:
    """Mark a slot empty (its owner is not writing it: a step being dropped is not in flight)."""
    with contextlib.suppress(FileNotFoundError):
        with open(path, "r+b") as f:
            f.write(_SLOT_HEADER.pack(_SLOT_MAGIC, -1, 0, 0))


class IslandSnapshotStore(SnapshotStore):
    """One DiLoCo island's view of a store that every island of the run shares.

    Island k of M keeps its step s as the shared store's step s·M + k, so
    islands never overwrite each other and each completes its steps alone
    (by `put_shard`: the islands' ranks share numbers, so no slots).
    Islands step independently between outer syncs, so a state every island
    can resume from together is a step complete on all of them; `retain`
    therefore keeps every own step from `floor(newest)` on: the newest
    complete step of the slowest island (which the islands tell each other).
    """

    def __init__(self, shared: SnapshotStore, island: int, islands: int,
                 floor: Callable[[int], int] = lambda newest: newest):
        self.shared, self.island, self.islands, self.floor = shared, island, islands, floor

    def _key(self, step: int) -> int:
        return step * self.islands + self.island

    def _own(self, keys: list[int]) -> list[int]:
        return [key // self.islands for key in keys if key % self.islands == self.island]

    def put_shard(self, step: int, rank: int, data: Union[Shard, np.ndarray]) -> None:
        self.shared.put_shard(self._key(step), rank, data)

    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        self.shared.put_meta(self._key(step), world, meta)

    def get_shard(self, step: int, rank: int) -> Buffer:
        return self.shared.get_shard(self._key(step), rank)

    def get_meta(self, step: int) -> bytes:
        return self.shared.get_meta(self._key(step))

    def steps(self) -> list[int]:
        return self._own(self.shared.steps())

    def complete(self) -> list[int]:
        return self._own(self.shared.complete())

    def latest(self) -> Optional[int]:
        steps = self.complete()
        return max(steps) if steps else None

    def missing(self, step: int) -> Optional[str]:
        return self.shared.missing(self._key(step))

    def retain(self, step: int) -> None:
        keep_from = min(step, self.floor(step))
        for old in self.steps():
            if old < keep_from:
                self.drop(old)

    def drop(self, step: int) -> None:
        self.shared.drop(self._key(step))

    def drop_after(self, step: int) -> None:
        """Forget this island's steps past `step`: after a resume from `step` they belong to
        a history that no longer happens, and a step of the new one must not mix with them."""
        for newer in self.steps():
            if newer > step:
                self.drop(newer)

    def clear(self) -> None:
        for step in self.steps():
            self.drop(step)

    def close(self) -> None:
        self.shared.close()


def _write_atomically(path: Path, *chunks: tuple[int, Any], size: Optional[int] = None) -> None:
    """Write (offset, bytes) chunks under a temp name (gaps read as zeros), then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        with open(temp, "wb") as out:
            for offset, chunk in chunks:
                if out.tell() != offset:
                    out.seek(offset)
                out.write(chunk)
            if size is not None:
                out.truncate(size)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
