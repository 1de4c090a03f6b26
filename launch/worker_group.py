"""A Ray worker group: one actor per rank, created, polled and shut down as one unit.

Each `TrainWorker` actor (launch/train_worker.py) trains on a thread of its
own, so it keeps answering the driver while it trains: `status()` returns the
rank's state (`running`, `finished`, `failed`) and its heartbeat (last
completed step, when, how it resumed). `RayWorkerGroup.poll()` asks every
rank at once and reports a rank whose process is gone as `dead` (or
`node_lost` when its node died) and one that does not answer in time as
`unanswered`; it decides nothing. What to do about it is the supervisor's
business (launch/supervisor.py).

The group binds every rendezvous to the address Ray gave its node, which is
127.0.0.1 on a cluster atoll started itself (launch/ray_backend.py).

With `launch.gpus_per_worker` = g ≥ 1 every bundle of the placement group
holds g GPUs and each rank's actor is created inside its bundle asking for
them, so Ray gives every rank GPUs of its own and shows the process only
those (CUDA_VISIBLE_DEVICES); the rank trains on the first it sees
(LOCAL_DEVICE_ENV, parallel/layout.py). Without GPUs nothing of this applies.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from atoll.launch.train_worker import TrainWorker
from atoll.parallel.layout import LOCAL_DEVICE_ENV, OUTER_STORE_ENV

# After a rank died, how long a shutdown waits for the others' training to end with an error
# (their next collective fails with the dead peer): those idle by then serve the next group.
SURVIVOR_WAIT_S = 0.5


class PlacementTimeout(RuntimeError):
    """The cluster cannot hold the requested workers within the placement timeout."""


@dataclass
class RankStatus:
    """What the driver knows of one rank after a poll."""

    rank: int
    state: str  # running | finished | failed | dead | node_lost | unanswered
    beat: dict = field(default_factory=dict)  # the rank's last heartbeat
    error: Optional[dict] = None  # {type, message, user, traceback} of a failed rank
    result: Optional[dict] = None  # the entry function's return value once finished


@dataclass
class RankInfo:
    rank: int
    pid: int
    node: str
    ip: str
    gpus: tuple[str, ...] = ()  # the ids of the GPUs Ray gave the rank


def local_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """(local rank, workers on that node) for each global rank."""
    seen: dict[str, int] = {}
    local = []
    for node in node_ids:
        local.append(seen.get(node, 0))
        seen[node] = seen.get(node, 0) + 1
    return [(rank, seen[node]) for rank, node in zip(local, node_ids)]


class ActorPool:
    """Warm spare actors (torch and atoll imported), so a new group skips the cold start.

    Spares hold no resources of their own (0 CPU, pinned to a node): the
    group's placement group reserves the CPUs, and its actors run on the
    bundles' nodes.

    After a rank died, the ranks whose training ended with an error (their
    collective failed with the dead peer) come back here as spares: their
    process is intact and warmer than a new one (its first training paid
    for lazy imports), and each one kept is one process less to start while
    the new group restores. A group placed on warm actors tops the pool up
    only once it has trained a step (`replenish` from `RayWorkerGroup.poll`),
    so new processes importing torch do not compete with its start for the
    CPU. The placement group of a group that lost a rank is kept too (`park`)
    and handed to the next group if it has the same shape and its nodes live.

    With GPUs there are no spares. Ray hands an actor its GPUs (and sets
    CUDA_VISIBLE_DEVICES in its process) only when it creates it, so a rank's
    actor is created inside its bundle, holding the bundle's GPUs; a spare
    waiting outside the group would need GPUs of its own, which a full node
    does not have and which would sit idle if it did. Such a group starts
    cold: its ranks import torch and atoll once placed (seconds).
    """

    def __init__(self, gpus_per_worker: int = 0, log: Callable[[str], None] = print) -> None:
        self.gpus = gpus_per_worker
        self.spares: list[tuple[str, Any]] = []  # (node, actor)
        self._parked: Optional[tuple[Any, list]] = None  # (placement group, its bundles)
        self._actor_cls = None
        self._log, self._said_no_spares = log, False
        self._imports: dict[int, Any] = {}  # id(spare actor) -> its warm_up call, until it returned

    def _new(self, node: str, rank: int = -1, bundle: Optional[tuple[Any, int]] = None):
        import ray
        from ray.util.scheduling_strategies import (NodeAffinitySchedulingStrategy,
                                                    PlacementGroupSchedulingStrategy)

        if self._actor_cls is None:
            self._actor_cls = ray.remote(num_cpus=0, max_restarts=0)(TrainWorker)
        if bundle is None:
            options = dict(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False))
        else:  # the bundle's GPUs become this actor's
            group, index = bundle
            options = dict(num_gpus=self.gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=index))
        actor = self._actor_cls.options(**options).remote(rank)
        imported = actor.warm_up.remote()  # starts importing now; later calls queue behind it
        if rank < 0:
            self._imports[id(actor)] = imported
        return actor

    def warming(self) -> bool:
        """Whether a spare is still starting or importing torch: seconds of CPU on its node,
        beside the ranks there (the straggler policy holds its scores meanwhile)."""
        import ray

        spares = {id(actor) for _, actor in self.spares}  # a spare taken or gone is not waited for
        refs = [ref for key, ref in self._imports.items() if key in spares]
        # A spare whose import failed is done too.
        waiting = set(ray.wait(refs, num_returns=len(refs), timeout=0)[1]) if refs else set()
        self._imports = {key: ref for key, ref in self._imports.items() if ref in waiting}
        return bool(self._imports)

    def has_spares(self, nodes: list[str], alive: set[str]) -> bool:
        """Whether a spare waits on every entry of `nodes` (no rank would start cold)."""
        have = [n for n, _ in self.spares if n in alive]
        for node in nodes:
            if node not in have:
                return False
            have.remove(node)
        return not self.gpus

    def keep(self, node: str, actor) -> None:
        """A survivor of a failed group, idle again: the next group takes it first."""
        self.spares.insert(0, (node, actor))

    def park(self, group, bundles: list) -> None:
        """Keep a group's placement group for the next group (one at a time)."""
        self.drop_parked()
        self._parked = (group, bundles)

    def placement(self, bundles: list, alive: set[str]):
        """The parked placement group if it has these bundles, is placed and its nodes
        live; else None (and it is removed)."""
        if self._parked is None:
            return None
        from ray.util.placement_group import placement_group_table

        group, parked_bundles = self._parked
        self._parked = None
        try:
            table = placement_group_table(group)
            if parked_bundles == bundles and table.get("state") == "CREATED" \
                    and set(table["bundles_to_node_id"].values()) <= alive:
                return group
        except Exception:
            pass
        _remove_placement_group(group)
        return None

    def drop_parked(self) -> None:
        if self._parked is not None:
            _remove_placement_group(self._parked[0])
            self._parked = None

    def take(self, nodes: list[str], alive: set[str], bundles: list[tuple[Any, int]]) -> list:
        """One actor per entry of `nodes`: a spare of that node if there is one, else a new one.
        `bundles`: (placement group, bundle index) of each entry, where an actor with GPUs is created."""
        if self.gpus:
            return [self._new(node, index, (group, index)) for node, (group, index) in zip(nodes, bundles)]
        self.spares = [(node, actor) for node, actor in self.spares if node in alive]
        taken = []
        for rank, node in enumerate(nodes):
            spare = next((i for i, (n, _) in enumerate(self.spares) if n == node), None)
            # Ray names an actor's log lines once, when it starts: a spare's say "worker".
            taken.append(self.spares.pop(spare)[1] if spare is not None else self._new(node, rank))
        return taken

    def replenish(self, nodes: list[str]) -> None:
        """Spares for a group on `nodes`, warming up in the background."""
        if self.gpus:
            if not self._said_no_spares:
                self._said_no_spares = True
                self._log(f"worker group: no warm spare actors with launch.gpus_per_worker={self.gpus}: "
                          "Ray gives an actor its GPUs only when it creates it, so every rank's actor "
                          "is created in its bundle and a restarted group starts cold")
            return
        have = [n for n, _ in self.spares]
        for node in nodes:
            if node in have:
                have.remove(node)
            else:
                self.spares.append((node, self._new(node)))

    def close(self) -> None:
        import ray

        for _, actor in self.spares:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        self.spares = []
        self.drop_parked()


def _remove_placement_group(group) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.util.remove_placement_group(group)


class RayWorkerGroup:
    """`world` actors on one placement group; started, polled and killed together."""

    def __init__(self, cpus_per_worker: int, world: int, placement_timeout_s: float,
                 pool: Optional[ActorPool] = None, islands: int = 1, outer_store: str = "",
                 gpus_per_worker: int = 0, cluster_fixed: bool = False):
        self.cpus, self.gpus, self.world = cpus_per_worker, gpus_per_worker, world
        # A cluster atoll started itself never grows: a GPU shortfall fails at once, while a
        # cluster it joined may gain nodes (an autoscaler, a node back) within the timeout.
        self.cluster_fixed = cluster_fixed
        # DiLoCo islands rendezvous each on their own, and meet in the launcher's store.
        self.islands, self.outer_store = islands, outer_store
        self._env_extra: dict[str, str] = {}
        self.placement_timeout_s = placement_timeout_s
        self.pool = pool or ActorPool(gpus_per_worker)
        self.actors: list = []
        self.pg = None
        self.ranks: list[RankInfo] = []
        self._pending: dict[int, Any] = {}  # rank -> status call not answered yet
        self._states: dict[int, str] = {}  # rank -> its state at the last poll
        self._replenish: Optional[list[str]] = None  # nodes to top the pool up for, after a step
        self._stepped = False  # some rank completed a step since the group started

    def create(self) -> list[RankInfo]:
        """Reserve the resources and take warm actors on them; raises PlacementTimeout."""
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        cpus, gpus = self.cpus, self.gpus
        if gpus and self.cluster_fixed:
            total = ray.cluster_resources().get("GPU", 0)
            if total < self.world * gpus:
                raise PlacementTimeout(f"cannot place {self.world} workers × {gpus} GPU: the Ray "
                                       f"cluster has {total:g} GPUs (launch.gpus_per_worker={gpus})")
        bundle = {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        self.pg = self.pool.placement([bundle] * self.world, alive)
        if self.pg is None:
            self.pg = placement_group([bundle] * self.world, strategy="PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            have = ray.available_resources()
            self.shutdown()
            asked, free = f"{cpus} CPU", f"{have.get('CPU', 0):g} CPUs"
            if gpus:
                asked, free = f"{asked} + {gpus} GPU", f"{free} and {have.get('GPU', 0):g} GPUs"
            raise PlacementTimeout(f"cannot place {self.world} workers × {asked} within "
                                   f"{self.placement_timeout_s:g}s: {free} free in the Ray cluster")
        bundle_nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        nodes = [bundle_nodes[rank] for rank in range(self.world)]
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        self._bundles = [bundle] * self.world
        warm = self.pool.has_spares(nodes, alive)
        self.actors = self.pool.take(nodes, alive, [(self.pg, rank) for rank in range(self.world)])
        infos = ray.get([actor.info.remote(rank) for rank, actor in enumerate(self.actors)])
        ray.get([actor.warm_up.remote() for actor in self.actors])
        self.ranks = [RankInfo(rank, info["pid"], info["node"], info["ip"], tuple(info["gpus"]))
                      for rank, info in enumerate(infos)]
        self._infos = list(infos)
        self._states, self._stepped = {}, False
        # The next group's actors warm up while this one trains: a group that started cold
        # has nothing to protect, one on warm actors waits for its first step.
        self._replenish = nodes
        if not warm:
            self._replenish_now()
        return self.ranks

    def _replenish_now(self) -> None:
        if self._replenish is not None:
            self.pool.replenish(self._replenish)
            self._replenish = None

    def start(self, recipe: dict, store: Any = None, attempt: int = 0) -> None:
        if self.islands > 1:  # every start of the whole group meets under a prefix of its own
            self._env_extra = {OUTER_STORE_ENV: f"{self.outer_store}/group-{attempt}"}
        self._start_ranks(range(self.world), recipe, store, attempt)

    def _start_ranks(self, ranks, recipe: dict, store: Any, attempt: int,
                     rejoin_token: Optional[str] = None) -> None:
        local = local_ranks([r.node for r in self.ranks])
        island_world = self.world // self.islands
        for rank in ranks:
            master = self._infos[rank - rank % island_world if self.islands > 1 else 0]
            env = {"RANK": str(rank), "WORLD_SIZE": str(self.world),
                   "LOCAL_RANK": str(local[rank][0]), "LOCAL_WORLD_SIZE": str(local[rank][1]),
                   "MASTER_ADDR": master["ip"], "MASTER_PORT": str(master["port"]), **self._env_extra}
            if self.gpus:  # Ray shows the rank only its own GPUs, numbered from 0
                env[LOCAL_DEVICE_ENV] = "0"
            self.actors[rank].start.remote(env, recipe, store, attempt, rejoin_token)

    def restart_island(self, island: int, recipe: dict, store: Any, attempt: int) -> list[RankInfo]:
        """Kill one DiLoCo island's actors and start new ones on the same nodes; they rejoin
        the islands that kept going. The other ranks are not touched."""
        import ray

        island_world = self.world // self.islands
        ranks = range(island * island_world, (island + 1) * island_world)
        for rank in ranks:
            with contextlib.suppress(Exception):
                ray.kill(self.actors[rank], no_restart=True)
            self._pending.pop(rank, None)
        nodes = [self.ranks[rank].node for rank in ranks]
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if any(node not in alive for node in nodes):
            raise PlacementTimeout(f"island {island}'s node is gone")
        fresh = self.pool.take(nodes, alive, [(self.pg, rank) for rank in ranks])
        infos = ray.get([actor.info.remote(rank) for rank, actor in zip(ranks, fresh)])
        ray.get([actor.warm_up.remote() for actor in fresh])
        for rank, actor, info in zip(ranks, fresh, infos):
            self.actors[rank], self._infos[rank] = actor, info
            self.ranks[rank] = RankInfo(rank, info["pid"], info["node"], info["ip"], tuple(info["gpus"]))
        self._start_ranks(ranks, recipe, store, attempt, rejoin_token=f"attempt-{attempt}")
        self.pool.replenish(nodes)
        return self.ranks

    def poll(self, timeout_s: float) -> list[RankStatus]:
        """Every rank's status; one outstanding call per rank, never more."""
        import ray

        for rank, actor in enumerate(self.actors):
            if rank not in self._pending:
                self._pending[rank] = actor.status.remote()
        refs = list(self._pending.values())
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        statuses = []
        for rank in range(len(self.actors)):
            ref = self._pending[rank]
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                statuses.append(RankStatus(rank, "unanswered"))
                continue
            del self._pending[rank]
            try:
                answer = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                # The connection broke but Ray does not know yet whether the actor
                # (or its node) is dead: ask again until it does.
                statuses.append(RankStatus(rank, "unanswered"))
                continue
            except ray.exceptions.RayActorError as exc:
                statuses.append(RankStatus(rank, self._death_kind(rank),
                                           error={"type": type(exc).__name__,
                                                  "message": _first_line(exc), "user": False}))
                continue
            statuses.append(RankStatus(rank, answer["state"], answer["beat"] or {},
                                       answer["error"], answer["result"]))
        self._states.update({s.rank: s.state for s in statuses if s.state != "unanswered"})
        self._stepped = self._stepped or any(
            s.beat.get("step") is not None and s.beat["step"] > (s.beat.get("resumed_step") or 0)
            for s in statuses)
        if self._stepped:
            self._replenish_now()
        return statuses

    def warming(self) -> bool:
        """Whether processes still start beside this group's ranks: its spares (`ActorPool.warming`),
        or the ones it starts after its first step."""
        return self._replenish is not None or self.pool.warming()

    def _death_kind(self, rank: int) -> str:
        """`node_lost` when the rank's node is gone too, else `dead`."""
        import ray

        node = self.ranks[rank].node if rank < len(self.ranks) else None
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return "dead" if node in alive else "node_lost"

    def request_stop(self, reason: str) -> None:
        for actor in self.actors:
            actor.request_stop.remote(reason)

    def shutdown(self) -> None:
        import ray

        restarting = self._a_rank_died()  # the supervisor restarts the same shape at once
        survivors = self._survivors() if restarting else set()
        for rank, actor in enumerate(self.actors):
            if rank in survivors:
                self.pool.keep(self.ranks[rank].node, actor)
                continue
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone with its node
                pass
        self.actors, self._pending = [], {}
        self._replenish_now()  # a group that ended before its first step still leaves spares
        if self.pg is not None:
            if restarting:
                self.pool.park(self.pg, self._bundles)
            else:
                _remove_placement_group(self.pg)
            self.pg = None

    def _a_rank_died(self) -> bool:
        """A group that had stepped lost a rank's process on a live node (not a hang, not a
        lost node, not during its start): what the next group, of the same shape, recovers."""
        states = self._states.values()
        return self._stepped and "dead" in states and "node_lost" not in states

    def _survivors(self) -> set[int]:
        """Ranks that may serve the next group: once the group has stepped and a rank's process
        died (its node lives, so its sockets are closed), the others whose training has ended
        with an error within SURVIVOR_WAIT_S: their process is idle and intact. Not with GPUs
        (an actor holds its bundle's GPU), nor after a hang, a lost node or a rank's own error
        (it may be what failed, or a peer's collective may wait out its timeout), nor during
        a group's start (a rank may be half way through its rendezvous)."""
        states = self._states
        if self.gpus:
            return set()
        deadline = time.monotonic() + SURVIVOR_WAIT_S
        while "running" in states.values() and time.monotonic() < deadline:
            self.poll(0.05)  # updates self._states
        return {rank for rank, state in states.items() if state == "failed"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]
