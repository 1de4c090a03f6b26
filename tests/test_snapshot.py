"""Memory snapshots: bitwise restores, completeness rules, resharding across FSDP degrees.

Real torch.distributed (gloo on 127.0.0.1) throughout; a world of one still
runs in a process group, as the train loop does.
"""

from __future__ import annotations

import copy
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot import MemorySnapshotter, ShmSnapshotStore, restore_snapshot, shm_root
from atoll.checkpoint.snapshot_store import IslandSnapshotStore
from atoll.checkpoint.state import split_state
from conftest import free_port, run_two_ranks
from snapshot_script import full_tensors, tiny_states, train

SCRIPT = Path(__file__).with_name("snapshot_script.py")


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def snapshot_of(states: dict, store: ShmSnapshotStore, step: int, extra: dict) -> MemorySnapshotter:
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=2)
    snapshotter.save(step, states, extra)
    snapshotter.wait_copied()
    return snapshotter


def test_restore_is_bitwise_after_more_steps(tmp_path, world_of_one):
    model, optimizer, states = tiny_states()
    train(model, optimizer, 2, seed=0)
    states["progress"].values["step"] = 2
    expected = {name: t.clone() for name, t in split_state(states)[0].items()}
    assert any(name.endswith(".exp_avg_sq") for name in expected)
    store = ShmSnapshotStore(tmp_path / "shm")
    extra = {"samples": 8, "cursor": [1, 2.5, "x"], "nested": {"none": None, "flag": True}}
    events = []
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=2,
                                    on_event=lambda event, **fields: events.append(event))
    assert snapshotter.due(2) and not snapshotter.due(3)
    snapshotter.save(2, states, extra)
    snapshotter.wait_copied()
    # The copy is done: stepping now (while the put may still run) must not leak into the snapshot.
    train(model, optimizer, 2, seed=10)
    states["progress"].values["step"] = 4
    assert snapshotter.wait() and snapshotter.last_error is None and events == ["memory_snapshot"]
    assert store.latest() == 2
    assert not torch.equal(model.output.weight, expected["model.output.weight"])

    assert restore_snapshot(store, 2, states, process_group=snapshotter.group) == extra
    restored = split_state(states)[0]
    assert restored.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(restored[name], value), name
    assert torch.equal(model.output.weight, expected["model.output.weight"])  # into the live model
    assert states["progress"].values == {"step": 2}

    # The next snapshot reuses the buffer and retires the older step.
    snapshotter.save(4, states, {"samples": 16})
    assert snapshotter.wait() and store.steps() == [4]
    snapshotter.close()


def test_snapshots_go_straight_into_reused_slots_and_a_restart_overwrites_its_abandoned_steps(tmp_path,
                                                                                               world_of_one):
    """A rank's shard is copied straight into one of three slot files it reuses (no file per
    snapshot), the oldest first, and restores its own step bitwise. A restart that resumed
    from an older step writes over the steps the failed run went on to."""
    model, optimizer, states = tiny_states()
    root = tmp_path / "shm"
    snapshotter = MemorySnapshotter(ShmSnapshotStore(root), rank=0, world=1, is_coordinator=True, interval=1)
    expected = {}
    for step in range(1, 6):
        train(model, optimizer, 1, seed=step)
        states["progress"].values["step"] = step
        expected[step] = {name: t.clone() for name, t in split_state(states)[0].items()}
        snapshotter.save(step, states, {"at": step})
        assert snapshotter.wait(), snapshotter.last_error
    store = ShmSnapshotStore(root)  # another process's view
    assert sorted(p.name for p in root.iterdir()) == ["rank-0.slot0", "rank-0.slot1", "rank-0.slot2",
                                                      "step-00000005"]
    assert sorted(p.name for p in (root / "step-00000005").iterdir()) == ["meta.bin"]
    assert store.steps() == [5] and sorted(slot.step for slot in store._slots_of(0)) == [3, 4, 5]
    snapshotter.close()

    def restored_at(step: int) -> dict:
        checker = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1)
        assert restore_snapshot(store, step, states, process_group=checker.group) == {"at": step}
        checker.close()
        return {name: t.clone() for name, t in split_state(states)[0].items()}

    for name, value in expected[5].items():
        assert torch.equal(restored_at(5)[name], value), name

    # The run resumed from step 5 after a failure that had reached step 7 (complete) and 8 (a
    # shard without its meta): the new history's steps 6 and 7 replace them.
    for step in (7, 8):
        store.shard_buffer(step, 0, 16)[:] = 0
        store.commit_shard(step, 0)
    store.put_meta(7, 1, b"not this history's")
    store.drop(7)  # a complete step past the one resumed is dropped (e.g. IslandSnapshotStore.drop_after)
    assert store.latest() == 5 and store.missing(8) == "no meta.bin"
    snapshotter = MemorySnapshotter(ShmSnapshotStore(root), rank=0, world=1, is_coordinator=True, interval=1)
    for step in (6, 7):
        train(model, optimizer, 1, seed=10 + step)
        states["progress"].values["step"] = step
        expected[step] = {name: t.clone() for name, t in split_state(states)[0].items()}
        snapshotter.save(step, states, {"at": step})
        assert snapshotter.wait(), snapshotter.last_error
    assert store.latest() == 7
    claims = [slot.step for slot in store._slots_of(0)]
    assert sorted(claims) == [5, 6, 7], claims  # no slot still claims the abandoned step 8
    for name, value in expected[7].items():
        assert torch.equal(restored_at(7)[name], value), name
    snapshotter.close()


class TensorState:
    """A Stateful holding one tensor, to change the structure of the snapshotted state."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def state_dict(self) -> dict:
        return {"tensor": self.tensor}

    def load_state_dict(self, state: dict) -> None:
        self.tensor.copy_(state["tensor"])


def test_later_snapshots_reuse_the_plan_and_hold_their_own_step(tmp_path, world_of_one):
    """Snapshots of a state with the same structure reuse the first one's plan and still
    restore their own step's values bitwise; a state that gained a tensor is planned again."""
    model, optimizer, states = tiny_states()
    store = ShmSnapshotStore(tmp_path / "shm")
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1)
    snapshotter.save(0, states, {"at": 0})
    assert snapshotter.wait()
    first_plan = snapshotter._saved
    states["counter"] = TensorState(torch.zeros(3))
    expected = {}
    for step in (1, 2, 3):
        train(model, optimizer, 1, seed=step)
        states["progress"].values["step"] = step
        states["counter"].tensor += step
        expected[step] = {name: t.clone() for name, t in split_state(states)[0].items()}
        snapshotter.save(step, states, {"at": step})
        assert snapshotter.wait(), snapshotter.last_error
        if step == 1:
            planned = snapshotter._saved
            assert planned is not first_plan  # a tensor more: planned again
        assert snapshotter._saved is planned
    train(model, optimizer, 2, seed=9)
    states["counter"].tensor.zero_()
    assert restore_snapshot(store, 3, states, process_group=snapshotter.group) == {"at": 3}
    restored = split_state(states)[0]
    assert restored.keys() == expected[3].keys() and "counter.tensor" in restored
    for name, value in expected[3].items():
        assert torch.equal(restored[name], value), name
    assert not torch.equal(expected[2]["model.output.weight"], expected[3]["model.output.weight"])
    snapshotter.close()


class SlowStore(ShmSnapshotStore):
    """A store whose puts take as long as the test says (a busy keeper, a loaded node)."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.release = threading.Event()
        self.putting, self.stored = threading.Event(), threading.Event()

    def put_shard(self, step, rank, data):
        self.putting.set()
        self.release.wait(timeout=5)
        super().put_shard(step, rank, data)
        self.stored.set()


def test_the_loop_never_waits_for_the_store_and_the_snapshot_keeps_its_step(tmp_path, world_of_one):
    """Once the copies are staged the state may change, while the store is still taking its
    copy; the snapshot still restores the state it was taken of, bitwise."""
    model, optimizer, states = tiny_states()
    train(model, optimizer, 1, seed=0)
    expected = {name: t.clone() for name, t in split_state(states)[0].items()}
    store = SlowStore(tmp_path / "shm")
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1)
    snapshotter.save(1, states, {})
    snapshotter.wait_copied()
    assert store.putting.is_set() and not store.stored.is_set()  # the put is still running
    train(model, optimizer, 1, seed=1)  # the next optimizer step changes the state meanwhile
    store.release.set()
    assert snapshotter.wait(), snapshotter.last_error
    restore_snapshot(store, 1, states, process_group=snapshotter.group)
    restored = split_state(states)[0]
    for name, value in expected.items():
        assert torch.equal(restored[name], value), name
    snapshotter.close()


def test_snapshots_follow_tensors_that_were_replaced_or_moved(tmp_path, world_of_one):
    """Snapshots copy from where the state lives now: after an optimizer state loaded anew
    (new moment tensors), a parameter moved to new memory or a restore, the next snapshot
    holds those tensors' values, never the ones an earlier snapshot copied from."""
    model, optimizer, states = tiny_states()
    store = ShmSnapshotStore(tmp_path / "shm")
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1)

    def snapshot_then_check(step: int, change) -> None:
        train(model, optimizer, 1, seed=step)
        change()
        expected = {name: t.clone() for name, t in split_state(states)[0].items()}
        snapshotter.save(step, states, {})
        assert snapshotter.wait(), snapshotter.last_error
        train(model, optimizer, 1, seed=100 + step)  # in place, after the snapshot
        restore_snapshot(store, step, states, process_group=snapshotter.group)
        restored = split_state(states)[0]
        for name, value in expected.items():
            assert torch.equal(restored[name], value), (step, name)

    def new_moments() -> None:
        moments = [state["exp_avg"] for state in optimizer.state.values()]
        optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        assert all(state["exp_avg"] is not old for state, old in zip(optimizer.state.values(), moments))
        for state in optimizer.state.values():
            state["exp_avg"].add_(1.0)  # only the new tensors hold this

    def moved_parameter() -> None:
        model.output.weight.data = model.output.weight.data.clone() * 2

    snapshot_then_check(1, lambda: None)  # plans the copies
    snapshot_then_check(2, new_moments)
    snapshot_then_check(3, moved_parameter)
    snapshot_then_check(4, lambda: None)  # after the restore of step 3
    snapshotter.close()


class FullStore(ShmSnapshotStore):
    """A store that runs out of memory on its first shard."""

    def put_shard(self, step, rank, data):
        raise MemoryError("no room for the shard")


def test_failed_snapshot_is_reported_and_never_complete(tmp_path, world_of_one):
    model, optimizer, states = tiny_states()
    train(model, optimizer, 1, seed=0)
    store, events, warnings = FullStore(tmp_path / "shm"), [], []
    snapshotter = MemorySnapshotter(store, rank=0, world=1, is_coordinator=True, interval=1, warn=warnings.append,
                                    on_event=lambda event, **fields: events.append((event, fields)))
    snapshotter.save(1, states, {})
    snapshotter.wait_copied()  # the copy itself finished before the put failed
    assert not snapshotter.wait() and store.latest() is None
    assert snapshotter.last_error == "memory snapshot of step 1 failed: rank 0: MemoryError: no room for the shard"
    assert warnings == [snapshotter.last_error]
    assert events == [("snapshot_failed", {"step": 1, "error": snapshotter.last_error})]
    snapshotter.close()


def test_incomplete_snapshots_never_count(tmp_path):
    store = ShmSnapshotStore(tmp_path / "shm")
    shard = np.arange(10, dtype=np.uint8)
    for rank in (0, 1):
        store.put_shard(1, rank, shard)
    store.put_meta(1, 2, b"meta-1")
    shard[:] = 0  # the caller reuses its buffer: the store kept a copy
    assert np.array_equal(store.get_shard(1, 1), np.arange(10)) and store.get_meta(1) == b"meta-1"

    store.put_shard(2, 0, shard)  # step 2: meta, but rank 1's shard never arrived
    store.put_meta(2, 2, b"meta-2")
    store.put_shard(3, 0, shard)  # step 3: every shard, no meta
    store.put_shard(3, 1, shard)
    store.put_shard(4, 0, shard)  # step 4: rank 1's shard still half-written
    (tmp_path / "shm" / "step-00000004" / ".rank-1.bin.123-456.tmp").write_bytes(b"half")
    store.put_meta(4, 2, b"meta-4")
    assert store.latest() == 1
    assert store.missing(2) == "no shard of rank 1 (of 2)"
    assert store.missing(3) == "no meta.bin"
    assert store.missing(9) == "nothing stored"
    with pytest.raises(CheckpointError, match="step 2 is not complete: no shard of rank 1") as error:
        restore_snapshot(store, 2, {})
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="step 3 has no meta.bin"):
        store.get_meta(3)

    store.put_shard(4, 1, shard)
    assert store.latest() == 4
    store.retain(4)
    assert store.steps() == [4]
    with pytest.raises(CheckpointError, match="^memory snapshot of step 1 is not complete: nothing stored$"):
        restore_snapshot(store, 1, {})
    assert pickle.loads(pickle.dumps(store)).latest() == 4  # what the launcher hands each process
    store.clear()
    assert not (tmp_path / "shm").exists() and store.latest() is None


def test_islands_share_a_store_and_keep_what_a_common_resume_needs(tmp_path):
    """Two DiLoCo islands in one store: each completes its own steps; retain keeps every own
    step from the slowest island's newest on; drop_after forgets a history that is replaced."""
    shared = ShmSnapshotStore(tmp_path / "shm")
    newest: dict[int, int] = {}

    def floor_for(island):
        def floor(step):
            newest[island] = step
            return min(newest.get(i, -1) for i in (0, 1))
        return floor

    islands = [IslandSnapshotStore(shared, k, 2, floor=floor_for(k)) for k in (0, 1)]
    shard = np.arange(4, dtype=np.uint8)
    for step in range(1, 7):  # island 0 runs ahead: steps 1..6; island 1 reaches 3
        for k, store in enumerate(islands):
            if k == 1 and step > 3:
                continue
            store.put_shard(step, 0, shard + k)
            store.put_meta(step, 1, f"island {k} step {step}".encode())
            store.retain(step)
    islands[1].put_shard(4, 0, shard)  # island 1's step 4 still lacks its meta
    assert islands[0].complete() == [3, 4, 5, 6] and islands[1].complete() == [3]
    assert islands[1].latest() == 3 and islands[1].missing(4) == "no meta.bin"
    assert islands[0].get_meta(3) == b"island 0 step 3" and islands[1].get_meta(3) == b"island 1 step 3"
    assert np.array_equal(islands[1].get_shard(3, 0), shard + 1)
    islands[0].drop_after(3)  # both resume from step 3: island 0's steps 4..6 are of another history
    assert islands[0].complete() == [3] and islands[1].steps() == [3, 4]
    islands[1].clear()
    assert islands[1].steps() == [] and islands[0].complete() == [3]


def test_meta_is_unpickled_with_the_allow_list(tmp_path):
    store = ShmSnapshotStore(tmp_path / "shm")
    store.put_shard(5, 0, np.zeros(0, dtype=np.uint8))
    store.put_meta(5, 1, pickle.dumps({"metadata": print}))  # would call anything it names
    with pytest.raises(CheckpointError, match="builtins.print, which is not allowed"):
        restore_snapshot(store, 5, {})


def test_shm_root_is_one_folder_per_run_and_job(tmp_path):
    first_job = shm_root(str(tmp_path / "run"), "job-1")
    assert first_job == shm_root(str(tmp_path / "run"), "job-1") != shm_root(str(tmp_path / "other"), "job-1")
    second_job = shm_root(str(tmp_path / "run"), "job-2")
    other_run = shm_root(str(tmp_path / "other"), "job-1")
    try:
        for root in (first_job, other_run):
            ShmSnapshotStore(root).put_shard(1, 0, np.zeros(4, dtype=np.uint8))
        assert sorted(ShmSnapshotStore.remove_stale(second_job)) == [first_job]
        assert not first_job.exists() and other_run.exists()
    finally:
        for root in (first_job, second_job, other_run):
            ShmSnapshotStore(root).clear()


@pytest.mark.slow
def test_snapshots_reshard_between_one_process_and_two_fsdp_ranks(tmp_path, world_of_one):
    # World of one -> 2 FSDP ranks: the ranks restore this snapshot of step 2.
    model, optimizer, states = tiny_states()
    train(model, optimizer, 2, seed=0)
    states["progress"].values["step"] = 2
    one_store = ShmSnapshotStore(tmp_path / "one")
    snapshotter = snapshot_of(states, one_store, 2, {"from": "one"})
    assert snapshotter.wait(), snapshotter.last_error
    expected_one = full_tensors(states)

    run_two_ranks([str(SCRIPT), str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path)])

    on_two = torch.load(tmp_path / "restored.pt", weights_only=True)
    assert on_two["extra"] == {"from": "one"} and on_two["progress"] == {"step": 2}
    assert on_two["tensors"].keys() == expected_one.keys()
    for name, value in expected_one.items():
        assert torch.equal(on_two["tensors"][name], value), name

    # 2 FSDP ranks -> world of one: a fresh process-local model restores their snapshot of step 3.
    saved_by_two = torch.load(tmp_path / "saved.pt", weights_only=True)["tensors"]
    two_store = ShmSnapshotStore(tmp_path / "two")
    assert two_store.latest() == 3 and sorted(two_store.holdings()[3]["ranks"]) == [0, 1]
    _, _, fresh = tiny_states(seed=2)
    assert restore_snapshot(two_store, 3, fresh, process_group=snapshotter.group) == {"from": "fsdp", "world": 2}
    restored = full_tensors(fresh)
    assert restored.keys() == saved_by_two.keys()
    for name, value in saved_by_two.items():
        assert torch.equal(restored[name], value), name
    assert fresh["progress"].values == {"step": 3}
    snapshotter.close()
