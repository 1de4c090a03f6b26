"""Memory snapshots on Ray: one keeper actor per node, outliving the worker groups.

The driver starts a `SnapshotKeeper` on every node (no CPU reserved, pinned
to its node). A worker's `RaySnapshotStore.put_shard` puts its shard into
the object store once and hands it to its node's keeper and to
`checkpoint.memory_replicas` keepers on other nodes; each keeper puts a copy
that it owns on its own node (an object dies with its owner, and the
worker's object dies with the worker). It returns once every copy exists, so
a snapshot the coordinator marks complete survives the loss of any one node
(keeper included). `latest()`
merges what the live keepers hold. The training side only sees the
`SnapshotStore` interface (checkpoint/snapshot.py).
"""

from __future__ import annotations

from typing import Any, Optional

from atoll.checkpoint.manifest import CheckpointError
from atoll.checkpoint.snapshot_store import SnapshotStore

KEEPER_CALL_TIMEOUT_S = 10.0


class SnapshotKeeper:
    """Holds the snapshot shards of one node (wrapped with ray.remote by the driver)."""

    def __init__(self, node: str):
        self.node = node
        self.shards: dict[tuple[int, int], Any] = {}  # (step, rank) -> ObjectRef this keeper owns
        self.meta: dict[int, tuple[int, bytes]] = {}  # step -> (world, meta)

    def __repr__(self) -> str:
        return f"keeper-{self.node[:8]}"

    def hold(self, step: int, rank: int, shard) -> bool:
        """Own a copy of a shard: the worker's object dies with the worker, this one does not."""
        import ray

        self.shards[(step, rank)] = ray.put(shard)
        return True

    def put_meta(self, step: int, world: int, meta: bytes) -> bool:
        self.meta[step] = (world, meta)
        return True

    def holdings(self) -> dict[int, dict]:
        steps: dict[int, dict] = {}
        for step, rank in self.shards:
            steps.setdefault(step, {"world": None, "ranks": []})["ranks"].append(rank)
        for step, (world, _) in self.meta.items():
            steps.setdefault(step, {"world": None, "ranks": []})["world"] = world
        return steps

    def shard(self, step: int, rank: int) -> Optional[list]:
        ref = self.shards.get((step, rank))
        return None if ref is None else [ref]

    def get_meta(self, step: int) -> Optional[bytes]:
        found = self.meta.get(step)
        return None if found is None else found[1]

    def retain(self, step: int) -> None:
        for key in [k for k in self.shards if k[0] < step]:
            del self.shards[key]
        for key in [k for k in self.meta if k < step]:
            del self.meta[key]

    def clear(self) -> None:
        self.shards.clear()
        self.meta.clear()


def start_keepers(nodes: list[str], existing: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A keeper on every node in `nodes` that has none yet; returns node -> handle."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    keepers = dict(existing or {})
    actor_cls = ray.remote(num_cpus=0, max_restarts=0)(SnapshotKeeper)
    for node in nodes:
        if node not in keepers:
            keepers[node] = actor_cls.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
            ).remote(node)
    ray.get([k.holdings.remote() for k in keepers.values()], timeout=60)
    return keepers


def live_keepers(keepers: dict[str, Any], alive_nodes: set[str]) -> dict[str, Any]:
    return {node: k for node, k in keepers.items() if node in alive_nodes}


class RaySnapshotStore(SnapshotStore):
    """The keepers of the nodes alive when the group started, as a SnapshotStore."""

    def __init__(self, keepers: dict[str, Any], replicas: int):
        self.keepers = dict(sorted(keepers.items()))
        self.replicas = min(replicas, max(0, len(self.keepers) - 1))

    def _targets(self) -> list[Any]:
        """This node's keeper first, then the next `replicas` nodes in ring order."""
        import ray

        nodes = list(self.keepers)
        here = ray.get_runtime_context().get_node_id()
        start = nodes.index(here) if here in nodes else 0
        return [self.keepers[nodes[(start + i) % len(nodes)]] for i in range(self.replicas + 1)]

    def put_shard(self, step: int, rank: int, data) -> None:
        import ray

        ref = ray.put(data)  # once; each keeper pulls it to its node and keeps its own copy
        ray.get([k.hold.remote(step, rank, ref) for k in self._targets()],
                timeout=KEEPER_CALL_TIMEOUT_S * 3)

    def put_meta(self, step: int, world: int, meta: bytes) -> None:
        import ray

        ray.get([k.put_meta.remote(step, world, meta) for k in self.keepers.values()],
                timeout=KEEPER_CALL_TIMEOUT_S)

    def _ask_all(self, method: str, *args) -> list:
        """Answers of the keepers still alive (a lost node's keeper is skipped)."""
        import ray

        refs = [getattr(k, method).remote(*args) for k in self.keepers.values()]
        answers = []
        for ref in refs:
            try:
                answers.append(ray.get(ref, timeout=KEEPER_CALL_TIMEOUT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue
        return answers

    def _merged(self) -> dict[int, tuple[Optional[int], set]]:
        """step -> (world from the meta, ranks held by some live keeper)."""
        merged: dict[int, tuple[Optional[int], set]] = {}
        for holdings in self._ask_all("holdings"):
            for step, held in holdings.items():
                world, ranks = merged.get(step, (None, set()))
                merged[step] = (held["world"] if held["world"] is not None else world,
                                ranks | set(held["ranks"]))
        return merged

    def steps(self) -> list[int]:
        return sorted(self._merged())

    def missing(self, step: int) -> Optional[str]:
        world, ranks = self._merged().get(step, (None, set()))
        return _missing(world, ranks)

    def latest(self) -> Optional[int]:
        merged = self._merged()  # one round of questions, not one per step
        complete = [step for step, (world, ranks) in merged.items() if _missing(world, ranks) is None]
        return max(complete) if complete else None

    def get_shard(self, step: int, rank: int):
        import ray

        for boxed in self._ask_all("shard", step, rank):
            if boxed is not None:
                try:
                    return ray.get(boxed[0], timeout=KEEPER_CALL_TIMEOUT_S * 3)
                except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                    continue
        raise CheckpointError(f"no live keeper holds rank {rank} of memory snapshot step {step}")

    def get_meta(self, step: int) -> bytes:
        for meta in self._ask_all("get_meta", step):
            if meta is not None:
                return meta
        raise CheckpointError(f"no live keeper holds the metadata of memory snapshot step {step}")

    def retain(self, step: int) -> None:
        self._ask_all("retain", step)

    def clear(self) -> None:
        self._ask_all("clear")

    def close(self) -> None:
        pass


def _missing(world: Optional[int], ranks: set) -> Optional[str]:
    if world is None:
        return "no meta" if ranks else "nothing stored"
    absent = sorted(set(range(world)) - ranks)
    return f"no shard of rank {', '.join(map(str, absent))} (of {world})" if absent else None
