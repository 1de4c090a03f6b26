"""The link between DiLoCo islands: collectives, membership and agreement.

An `OuterGroup` joins one rank with its counterparts (the same in-island
rank) in every island that is currently a member. Pseudo-gradients travel
over a gloo group of those ranks, built on a key-value store that outlives
islands (the launcher's, or the run's), so it never shares a connection
with an island's own collectives. Transfers start in the background and are
waited for later, so a reduction can overlap inner steps; a bandwidth limit
(`bandwidth_mbit`) holds each transfer back until a link of that speed would
have delivered it, so benchmarks project onto islands joined by a WAN.

Islands fail. Every reduction ends in `settle`: each island agrees with its
own ranks whether its transfers arrived, its first rank votes in the store,
and the first vote count that is complete (or the first that runs out of
`timeout_s`) is written once with compare-and-set, so every island reads the
same decision: `ok` (every member delivered) or `retry` with the islands
that voted. Small agreements (the state's hash, start-up) go through the
store alone, so only payloads cross the islands' link. On `retry` the survivors reconnect as a new epoch and send the
same payloads again; an island left out of the decision raises `IslandLost`
and its launcher restarts it. A restarted island asks to join in the store;
the next decision that sees it admits it at an outer-step boundary, and its
state comes from a peer (DiLoCo's `admit`/`join`). The votes also carry
each island's data position, so the positions every island has committed
to the global model are known to all of them, and `agree_hash` compares the
shared state's sha256 across islands through the same store.

This module knows process groups and the store; it knows nothing of models,
parameters or the launcher.
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

POLL_S = 0.002


class DilocoError(RuntimeError):
    """The islands' shared state diverged or an outer reduction failed; names the island."""


class StateDiverged(DilocoError):
    """The shared state's sha256 differs between islands: a bug or corruption, never retried."""


class IslandLost(DilocoError):
    """This island was left out of the islands' decision (it was too slow or cut off)."""


@dataclass
class Transfer:
    """One collective in flight; `restart` sends the same input again on the current group."""

    kind: str  # all_reduce_sum | all_gather
    tensor: torch.Tensor
    nbytes: int = 0
    ready_at: float = 0.0
    work: Any = None
    out: Any = None
    failed: Optional[str] = None


@dataclass
class Decision:
    ok: bool
    members: list[int]
    positions: dict[int, int] = field(default_factory=dict)
    joiners: dict[int, str] = field(default_factory=dict)  # island -> its join token


class OuterGroup:
    def __init__(self, store: dist.Store, island: int, islands: int, in_island_rank: int,
                 timeout_s: float, bandwidth_mbit: float = 0.0,
                 island_all: Optional[Callable[[bool], bool]] = None,
                 joining: bool = False):
        self.store = dist.PrefixStore("atoll/outer", store)
        self.island, self.islands, self.rank = island, islands, in_island_rank
        self.timeout_s, self.bandwidth_mbit = timeout_s, bandwidth_mbit
        # AND over this island's ranks: the island speaks with one voice in the store.
        self.island_all = island_all or (lambda ok: ok)
        self.members = list(range(islands))
        self.epoch = 0
        self.round = 0
        self.bytes_sent = 0  # since the last take_bytes()
        self.total_bytes = 0  # since the start
        self.changes: list[dict] = []  # membership changes not yet reported
        self._link_free_at = 0.0
        self.pg: Optional[dist.ProcessGroup] = None
        if not joining:  # a restarted island connects once it is admitted (`join`)
            self._connect()

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def index(self) -> int:
        return self.members.index(self.island)

    def _connect(self) -> None:
        prefix = f"rank-{self.rank}/epoch-{self.epoch}"
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, self.store), self.index, self.size,
                                        datetime.timedelta(seconds=self.timeout_s))

    # ------------------------------------------------------------------ transfers

    def start(self, transfer: Transfer) -> Transfer:
        """Send `transfer` on the current group; it completes in the background."""
        transfer.failed = None
        tensor = transfer.tensor
        try:
            if transfer.kind == "all_reduce_sum":
                transfer.out = tensor.clone()
                transfer.work = self.pg.allreduce([transfer.out])
                # a ring all-reduce sends 2(n-1)/n of the buffer
                transfer.nbytes = int(2 * (self.size - 1) / self.size * tensor.numel() * tensor.element_size())
            else:
                transfer.out = [torch.empty_like(tensor) for _ in range(self.size)]
                transfer.work = self.pg.allgather([transfer.out], [tensor])
                transfer.nbytes = (self.size - 1) * tensor.numel() * tensor.element_size()
        except Exception as exc:  # a peer is gone before the send even started
            transfer.work, transfer.failed = None, _one_line(exc)
        now = time.perf_counter()
        start = max(now, self._link_free_at)
        transfer.ready_at = start + (transfer.nbytes * 8 / (self.bandwidth_mbit * 1e6)
                                     if self.bandwidth_mbit else 0.0)
        self._link_free_at = transfer.ready_at
        return transfer

    def _wait(self, transfer: Transfer) -> bool:
        if transfer.failed is None:
            try:
                transfer.work.wait()
            except Exception as exc:
                transfer.failed = _one_line(exc)
        delay = transfer.ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return transfer.failed is None

    def settle(self, transfers: list[Transfer], position: int) -> Decision:
        """Wait for `transfers`; once every member has them all, the decision (with every
        member's committed data position). Survivors of a failure send again."""
        while True:
            delivered = all([self._wait(t) for t in transfers])
            decision = self._decide(self.island_all(delivered), position)
            if decision.ok:
                sent = sum(t.nbytes for t in transfers)
                self.bytes_sent += sent
                self.total_bytes += sent
                return decision
            self._regroup(decision.members)
            for t in transfers:
                self.start(t)

    # ------------------------------------------------------------------ agreement

    def _key(self, *parts: Any) -> str:
        return "/".join(str(p) for p in parts)

    def _decide(self, ok: bool, position: int) -> Decision:
        this_round, self.round = self.round, self.round + 1
        decision_key = self._key("decision", this_round)
        if self.is_lead:
            self.store.set(self._key("vote", this_round, self.island),
                           json.dumps({"ok": ok, "position": position}))
        deadline = time.monotonic() + self.timeout_s
        while not self.store.check([decision_key]):
            if self.is_lead:
                proposal = self._propose(this_round, deadline)
                if proposal is not None:
                    self.store.compare_set(decision_key, "", json.dumps(proposal))
                    break
            elif time.monotonic() > deadline + self.timeout_s:
                raise DilocoError(f"island {self.island}: no outer decision within "
                                  f"{2 * self.timeout_s:g}s (diloco.wait_timeout_s)")
            time.sleep(POLL_S)
        value = json.loads(self.store.get(decision_key))
        decision = Decision(value["ok"], value["members"],
                            {int(k): v for k, v in value["positions"].items()},
                            {int(k): v for k, v in value["joiners"].items()})
        if self.island not in decision.members:
            raise IslandLost(f"island {self.island} was left out of the outer reduction at round "
                             f"{this_round} (no answer within diloco.wait_timeout_s={self.timeout_s:g}s)")
        return decision

    def _propose(self, this_round: int, deadline: float) -> Optional[dict]:
        keys = {i: self._key("vote", this_round, i) for i in self.members}
        voted = {i: json.loads(self.store.get(k)) for i, k in keys.items() if self.store.check([k])}
        complete = len(voted) == len(self.members)
        if not complete and time.monotonic() < deadline:
            return None
        if complete and all(v["ok"] for v in voted.values()):
            joiners = {}
            for island in range(self.islands):
                key = self._key("join", island)
                if island not in self.members and self.store.check([key]):
                    joiners[island] = self.store.get(key).decode()
            return {"ok": True, "members": self.members, "joiners": joiners,
                    "positions": {i: v["position"] for i, v in voted.items()}}
        return {"ok": False, "members": sorted(voted), "positions": {}, "joiners": {}}

    def _regroup(self, members: list[int]) -> None:
        lost = [i for i in self.members if i not in members]
        self.epoch += 1
        self.members = sorted(members)
        for island in lost:
            self.changes.append({"island": island, "change": "lost", "islands_now": self.size})
        self.pg = None
        self._connect()

    def agree(self, name: str, value: str, timeout_s: float, required: bool = True) -> dict[int, str]:
        """Every member island's `value` for `name` (its first rank writes it to the store).
        A member that has not answered within `timeout_s` is an error when `required`, else
        left out: it is lost, and the next reduction finds that out for everyone."""
        key = lambda island: self._key("agree", name, self.epoch, self.round, island)
        if self.is_lead:
            self.store.set(key(self.island), value)
        keys = {island: key(island) for island in self.members}
        deadline = time.monotonic() + timeout_s
        while not self.store.check(list(keys.values())):
            if time.monotonic() > deadline:
                break
            time.sleep(POLL_S)
        found = {island: self.store.get(k).decode() for island, k in keys.items() if self.store.check([k])}
        missing = sorted(set(keys) - set(found))
        if missing and required:
            raise DilocoError(f"islands {missing} did not reach '{name}' within {timeout_s:g}s")
        return found

    def agree_hash(self, digest: str) -> None:
        """Every member's sha256 of the shared state equals this island's, else StateDiverged."""
        for island, other in sorted(self.agree("sha256", digest, self.timeout_s, required=False).items()):
            if other != digest:
                raise StateDiverged(f"DiLoCo state diverged at round {self.round}: island {island}'s "
                                    f"sha256 differs from island {self.island}'s")

    # ------------------------------------------------------------------ joining

    def admit(self, joiners: dict[int, str], state_round: int) -> int:
        """Members: take the joiners in (a new epoch); returns the index of the state's source."""
        members = sorted(self.members + list(joiners))
        source = self.members[0]
        invite = json.dumps({"epoch": self.epoch + 1, "members": members, "round": state_round,
                             "source": source})
        if self.is_lead:
            for island, token in joiners.items():
                self.store.set(self._key("invite", island, token), invite)
                self.store.delete_key(self._key("join", island))
        self.epoch += 1
        self.members = members
        for island in joiners:
            self.changes.append({"island": island, "change": "rejoined", "islands_now": self.size})
        self.pg = None
        self._connect()
        return members.index(source)

    def join(self, token: str, timeout_s: float) -> Optional[int]:
        """A restarted island: ask to join, wait for the invitation, connect; returns the
        index of the member that sends the state, or None once the run has finished."""
        if self.is_lead:
            self.store.set(self._key("join", self.island), token)
        key = self._key("invite", self.island, token)
        deadline = time.monotonic() + timeout_s
        while not self.store.check([key]):
            if self.store.check(["finished"]):
                return None
            if time.monotonic() > deadline:
                raise DilocoError(f"island {self.island} was not admitted back within {timeout_s:g}s")
            time.sleep(0.02)
        invite = json.loads(self.store.get(key))
        self.epoch, self.members, self.round = invite["epoch"], invite["members"], invite["round"]
        self.pg = None
        self._connect()
        return self.members.index(invite["source"])

    def announce_finished(self) -> None:
        """The members ended the run: an island still waiting to join has nothing to do."""
        if self.is_lead:
            self.store.set("finished", "1")

    def broadcast(self, tensors: list[torch.Tensor], source_index: int) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = source_index
        for tensor in tensors:
            self.pg.broadcast([tensor], options).wait()

    # ------------------------------------------------------------------ checkpoints

    def report_saved(self, step: int) -> None:
        """This island's checkpoint files of `step` are durable (called by its lead)."""
        self.store.set(self._key("saved", step, self.island), "1")

    def wait_saved(self, step: int, timeout_s: float) -> None:
        """Until every member island reported its files of `step`."""
        keys = [self._key("saved", step, island) for island in self.members]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [i for i, k in zip(self.members, keys) if not self.store.check([k])]
                raise DilocoError(f"islands {missing} did not write their part of the checkpoint "
                                  f"of step {step} within {timeout_s:g}s")
            time.sleep(0.05)

    def snapshot_floor(self, newest: int) -> int:
        """This island's newest complete memory snapshot is `newest` (told by its lead); the
        oldest step a member island may still need: the slowest member's newest, or -1
        while some member has told nothing yet. Called from a snapshot thread: store only."""
        self.store.set(self._key("snapshot", self.island), str(newest))
        keys = [self._key("snapshot", island) for island in self.members]
        if not self.store.check(keys):
            return -1
        return min(int(value) for value in self.store.multi_get(keys))

    # ------------------------------------------------------------------ bookkeeping

    def take_bytes(self) -> int:
        value, self.bytes_sent = self.bytes_sent, 0
        return value

    def take_changes(self) -> list[dict]:
        value, self.changes = self.changes, []
        return value

    def close(self) -> None:
        self.pg = None  # gloo closes its connections when the group is released


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text or type(exc).__name__)[:300]
