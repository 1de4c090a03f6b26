"""DiLoCo: islands of compute that train one model and talk only every H steps.

Each island is a replica of the whole pp × dp × ep layout with its own
process group (parallel/layout.py) and its own data stream. Every
`diloco.inner_steps` (H) steps the islands average their pseudo-gradients
(the distance each island moved from where it started) and an outer
optimizer (SGD, Nesterov momentum by default) moves the global parameters,
which every island then continues from.

Streaming: the parameters form `fragments` (F) groups (by layer); fragment p
syncs on the steps s ≡ (p+1)·H/F (mod H), so each sync carries 1/F of the
model. A fragment's reduction runs in the background while `overlap_steps`
(τ) further inner steps run; when it lands, the island keeps what it learned
meanwhile (local ← global + progress since the send). With `delayed_update`
the reduction of a round overlaps the whole next round: the true outer
update is applied one round late, and each island starts its next round
from an eager estimate that mixes its own fresh pseudo-gradient with the
previous round's average ((Δ_own + (M−1)·Δ̄_prev) / M), so it never waits.
The global parameters and the outer optimizer only ever see the averaged,
agreed values, so they stay bit-identical on every island in every mode;
their sha256 (with the outer step and every island's committed data
position) is compared after every outer step.

This module knows parameters and the outer group (parallel/outer_group.py);
it knows nothing of the model's structure, checkpoint files or the launcher.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from atoll.parallel.outer_group import DilocoError, OuterGroup, Transfer
from atoll.parallel.pseudo_grad_codecs import Codec

__all__ = ["DiLoCo", "DilocoError", "fragment_of"]


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def fragment_of(name: str, layers: int, fragments: int) -> int:
    """The fragment a parameter belongs to: contiguous layer ranges; embeddings go with
    the first fragment, everything after the last layer with the last."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if match:
        return int(match.group(1)) * fragments // layers
    return 0 if "embed" in name else fragments - 1


@dataclass
class _Sync:
    """One fragment's reduction between its send and its outer update."""

    fragment: int
    send_step: int
    apply_step: int
    position: int  # this island's data position when it sent: what its pseudo-gradient covers
    delta: torch.Tensor  # what this island sent, before encoding (fp32, flat)
    payload: Optional[Transfer]  # None where this rank holds none of the fragment (a pipeline stage)
    buffers: Optional[Transfer]
    sent_at: float
    local_at_send: Optional[list[torch.Tensor]] = None  # overlap: to keep the progress since
    buffers_at_send: Optional[torch.Tensor] = None

    @property
    def transfers(self) -> list[Transfer]:
        return [t for t in (self.payload, self.buffers) if t is not None]


@dataclass
class _Fragment:
    params: list[int]  # indices into DiLoCo.params
    buffers: list[int] = field(default_factory=list)
    offset: int = 0


class DiLoCo:
    """Global parameters, the outer optimizer and the outer step of one rank's shard.

    `params` are this rank's (name, parameter) pairs; `buffers` the state
    that is not a parameter but must agree across islands (the aux-free
    expert bias), averaged at each outer step of its fragment. `fragments`
    maps each parameter (and buffer) name to its fragment.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], buffers: list[tuple[str, torch.Tensor]],
                 group: OuterGroup, *, inner_steps: int, outer_lr: float, outer_momentum: float,
                 nesterov: bool, codec: Codec, fragments: int = 1,
                 fragment_of_name: Callable[[str], int] = lambda name: 0,
                 overlap_steps: int = 0, delayed_update: bool = False,
                 island_digest: Callable[[str], str] = lambda digest: digest):
        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        self.buffer_names = [name for name, _ in buffers]
        self.buffers = [b for _, b in buffers]
        self.group, self.codec = group, codec
        self.inner_steps, self.overlap_steps, self.delayed = inner_steps, overlap_steps, delayed_update
        self.lr, self.momentum = outer_lr, outer_momentum
        self.nesterov = nesterov and outer_momentum > 0
        self.island_digest = island_digest
        self.fragments = [_Fragment([], [], ((p + 1) * inner_steps // fragments) % inner_steps)
                          for p in range(fragments)]
        for index, name in enumerate(self.names):
            self.fragments[fragment_of_name(name)].params.append(index)
        for index, (name, _) in enumerate(buffers):
            self.fragments[fragment_of_name(name)].buffers.append(index)
        # Global copies with the parameters' placements, so that DCP reshards them like the model.
        self.global_params = [_like(p) for p in self.params]
        # The outer optimizer owns these local views (a DTensor's to_local() is a new view each call).
        self.global_locals = [local_view(g) for g in self.global_params]
        self.outer_optimizer = torch.optim.SGD(self.global_locals, lr=outer_lr, momentum=outer_momentum,
                                               nesterov=self.nesterov)
        if outer_momentum:  # zeros step exactly like torch's first-step clone, and are always there
            for g in self.outer_optimizer.param_groups[0]["params"]:
                self.outer_optimizer.state[g]["momentum_buffer"] = torch.zeros_like(g)
        self.errors = [_like(p, zero=True) for p in self.params] if codec.name == "int4" else []
        self.error_locals = [local_view(e) for e in self.errors]
        # Delayed updates measure each round from where the island started it (its eager start).
        self.starts = [g.clone() for g in self.global_locals] if delayed_update else []
        self.last_mean: dict[int, torch.Tensor] = {}  # fragment -> previous round's mean pseudo-gradient
        self.in_flight: list[_Sync] = []
        # Where syncs can be in flight between steps (overlap, delayed), what each one sent is
        # kept per parameter, so a snapshot or checkpoint taken meanwhile holds it (resharded
        # like the parameters) and a resume sends it again instead of losing the round.
        between_steps = overlap_steps > 0 or delayed_update
        self.sent = [_like(p, zero=True) for p in self.params] if between_steps else []
        self.sent_locals = [local_view(t) for t in self.sent]
        self.sent_params = [_like(p, zero=True) for p in self.params] if overlap_steps else []
        self.sent_buffers = [torch.zeros_like(b, dtype=torch.float32) for b in self.buffers] \
            if between_steps else []
        self.outer_step = 0
        self.positions: dict[int, int] = {}  # every island's committed data position
        self.last_hash = ""
        self.step = 0
        self.joiners: dict[int, str] = {}  # islands asking to join, admitted at the end of a step
        self.fragment_digests = [b""] * fragments
        self._hash_fragments()

    # ------------------------------------------------------------------ schedule

    def due(self, step: int) -> list[int]:
        """The fragments whose sync starts after inner step `step`."""
        return [p for p, frag in enumerate(self.fragments)
                if step > 0 and step % self.inner_steps == frag.offset]

    def after_inner_step(self, step: int, position: int, land_all: bool = False) -> list[dict[str, Any]]:
        """Land the reductions due now, start the syncs due now; the finished outer steps.
        `land_all` (the last step of this invocation) lands everything in flight, so nothing
        is left on the wire when the islands stop. A checkpoint or snapshot taken in between
        holds the syncs in flight (`state_dict`) and a resume sends them again."""
        self.step = step
        events = []
        if not self.delayed:
            for sync in [s for s in self.in_flight if s.apply_step == step]:
                events.append(self._land(sync))
        for fragment in self.due(step):
            if self.delayed:
                events += self._send_delayed(fragment, step, position)
            else:
                sync = self._send(fragment, step, position, self.overlap_steps)
                if self.overlap_steps == 0:
                    events.append(self._land(sync))
        if land_all:
            events += [self._land(sync) for sync in list(self.in_flight)]
        if self.joiners:
            self._admit()
        return events

    def finish(self, step: int, position: int) -> list[dict[str, Any]]:
        """At the end of the run: land everything in flight and sync every fragment that
        moved since its last sync, so the final model is the global one on every island."""
        self.step = step
        events = [self._land(sync) for sync in list(self.in_flight)]
        for fragment in range(len(self.fragments)):
            if fragment in self.due(step):
                continue  # sent after this very step, landed above
            sync = self._send(fragment, step, position, 0)
            events.append(self._land(sync))
        with torch.no_grad():
            for p, g in zip(self.params, self.global_locals):
                local_view(p).copy_(g)
        self.joiners = {}
        self.group.announce_finished()
        return events

    # ------------------------------------------------------------------ send and land

    def _average_mode(self) -> bool:
        """Outer lr 1 without momentum: the new global is the islands' mean itself (exact)."""
        return self.lr == 1.0 and self.momentum == 0.0 and not self.codec.lossy and not self.delayed

    @torch.no_grad()
    def _send(self, fragment: int, step: int, position: int, overlap: int) -> _Sync:
        frag = self.fragments[fragment]
        locals_ = [local_view(self.params[i]) for i in frag.params]
        if self.delayed:
            reference = [self.starts[i] for i in frag.params]
        else:
            reference = [self.global_locals[i] for i in frag.params]
        if self._average_mode():
            delta = _flat(locals_)  # the mean of the local parameters is the new global
        else:
            delta = _flat([r - p for r, p in zip(reference, locals_)])
            if self.errors:
                delta += _flat([self.error_locals[i] for i in frag.params])
        buffers = _flat([self.buffers[i] for i in frag.buffers])
        sync = _Sync(fragment, step, step + overlap, position, delta, None, None, 0.0)
        if overlap:
            sync.buffers_at_send = buffers
            if not self.delayed:  # delayed rounds restart from their eager estimate instead
                sync.local_at_send = [p.clone() for p in locals_]
        self._keep(sync)
        return self._start(sync, buffers)

    def _start(self, sync: _Sync, buffers: torch.Tensor) -> _Sync:
        """Put a sync's payload (and the router buffers) on the wire."""
        if sync.delta.numel():  # the same in-island rank holds the same shards on every island
            sync.payload = Transfer("all_gather", self.codec.encode(sync.delta)) if self.codec.lossy else \
                Transfer("all_reduce_sum", sync.delta)
        sync.buffers = Transfer("all_reduce_sum", buffers) if buffers.numel() else None
        sync.sent_at = time.perf_counter()
        for transfer in sync.transfers:
            self.group.start(transfer)
        self.in_flight.append(sync)
        return sync

    def _keep(self, sync: _Sync) -> None:
        """Copy what a sync sent into the per-parameter slots that `state_dict` holds."""
        if not self.sent:
            return
        frag = self.fragments[sync.fragment]
        slots = [self.sent_locals[i] for i in frag.params]
        for slot, value in zip(slots, _split(sync.delta, slots)):
            slot.copy_(value)
        if sync.local_at_send is not None:
            for i, value in zip(frag.params, sync.local_at_send):
                local_view(self.sent_params[i]).copy_(value)
        if sync.buffers_at_send is not None:
            slots = [self.sent_buffers[i] for i in frag.buffers]
            for slot, value in zip(slots, _split(sync.buffers_at_send, slots)):
                slot.copy_(value)

    @torch.no_grad()
    def _send_again(self, fragment: int, send_step: int, apply_step: int, position: int) -> None:
        """After a resume: the sync that was in flight when the state was saved, from its slots."""
        frag = self.fragments[fragment]
        sync = _Sync(fragment, send_step, apply_step, position,
                     _flat([self.sent_locals[i] for i in frag.params]), None, None, 0.0)
        if self.sent_params:
            sync.local_at_send = [local_view(self.sent_params[i]).clone() for i in frag.params]
        sync.buffers_at_send = _flat([self.sent_buffers[i] for i in frag.buffers])
        self._start(sync, sync.buffers_at_send.clone())

    @torch.no_grad()
    def _land(self, sync: _Sync) -> dict[str, Any]:
        """Wait for a sync, apply the outer update to its fragment, check the shared hash."""
        started, bytes_before = time.perf_counter(), self.group.total_bytes
        decision = self.group.settle(sync.transfers, sync.position)
        self.in_flight.remove(sync)
        self.positions.update(decision.positions)
        frag = self.fragments[sync.fragment]
        globals_ = [self.global_locals[i] for i in frag.params]
        mean = self._mean(sync)
        if self._average_mode():
            for g, m in zip(globals_, _split(mean, globals_)):
                g.copy_(m)
        else:
            for g, d in zip(globals_, _split(mean, globals_)):
                g.grad = d
            self.outer_optimizer.step()
            for g in globals_:
                g.grad = None
            self.last_mean[sync.fragment] = mean
        if not self.delayed:  # delayed rounds start from their eager estimate (_send_delayed)
            locals_ = [local_view(self.params[i]) for i in frag.params]
            if sync.local_at_send is None:
                for p, g in zip(locals_, globals_):
                    p.copy_(g)
            else:  # keep what the island learned while the reduction was in flight
                for p, g, sent in zip(locals_, globals_, sync.local_at_send):
                    p.copy_(g + (p - sent))
        self._land_buffers(sync, frag)
        self.outer_step += 1
        self.last_hash = self._agree_hash([sync.fragment])
        fields = {"outer_step": self.outer_step, "fragment": sync.fragment, "islands": self.group.size,
                  "seconds": round(time.perf_counter() - started, 4),
                  "in_flight_s": round(time.perf_counter() - sync.sent_at, 4),
                  "bytes_sent": self.group.total_bytes - bytes_before,
                  "positions": {str(k): v for k, v in sorted(self.positions.items())},
                  "state_sha256": self.last_hash}
        self.joiners.update(decision.joiners)
        return fields

    def _mean(self, sync: _Sync) -> torch.Tensor:
        transfer = sync.payload
        if transfer is None:
            return sync.delta
        if not self.codec.lossy:
            return transfer.out.div_(self.group.size)
        decoded = [self.codec.decode(payload, sync.delta.numel()) for payload in transfer.out]
        if self.errors:  # what this island's payload failed to carry goes out next time
            frag = self.fragments[sync.fragment]
            residual = sync.delta - decoded[self.group.index]
            for i, r in zip(frag.params, _split(residual, [self.error_locals[i] for i in frag.params])):
                self.error_locals[i].copy_(r)
        total = decoded[0].clone()
        for other in decoded[1:]:
            total += other
        return total.div_(self.group.size)

    def _land_buffers(self, sync: _Sync, frag: _Fragment) -> None:
        if sync.buffers is None:
            return
        buffers = [self.buffers[i] for i in frag.buffers]
        mean = sync.buffers.out.div_(self.group.size)
        drift = _flat(buffers) - sync.buffers_at_send if sync.buffers_at_send is not None else None
        if drift is not None:
            mean = mean + drift
        for b, m in zip(buffers, _split(mean, buffers)):
            b.copy_(m)

    @torch.no_grad()
    def _send_delayed(self, fragment: int, step: int, position: int) -> list[dict[str, Any]]:
        """Land the previous round's reduction (the true update, one round late), send this
        round's, and start the next round from the eager estimate."""
        events = [self._land(s) for s in [s for s in self.in_flight if s.fragment == fragment]]
        previous = self.last_mean.get(fragment)
        sync = self._send(fragment, step, position, self.inner_steps)
        frag = self.fragments[fragment]
        own = sync.delta
        islands = self.group.size
        estimate = own if previous is None else (own + (islands - 1) * previous) / islands
        globals_ = [self.global_locals[i] for i in frag.params]
        for i, start in zip(frag.params, self._eager_start(frag, _split(estimate, globals_))):
            local_view(self.params[i]).copy_(start)
            self.starts[i].copy_(start)
        return events

    def _eager_start(self, frag: _Fragment, estimate: list[torch.Tensor]) -> list[torch.Tensor]:
        """What the outer optimizer would make of the fragment with pseudo-gradient
        `estimate`, computed on copies: the shared state is not touched."""
        scratch = [self.global_locals[i].clone() for i in frag.params]
        optimizer = torch.optim.SGD(scratch, lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        momenta = _momenta(self.outer_optimizer)
        for j, (tensor, d) in enumerate(zip(scratch, estimate)):
            tensor.grad = d
            if momenta:
                optimizer.state[tensor]["momentum_buffer"] = momenta[frag.params[j]].clone()
        optimizer.step()
        return scratch

    # ------------------------------------------------------------------ agreement and joining

    def _digest(self, changed: Optional[list[int]] = None) -> str:
        """sha256 of the shared state: one digest per fragment (only `changed` ones are
        hashed again; None: all), the outer step and every island's committed position."""
        self._hash_fragments(changed)
        digest = hashlib.sha256(b"".join(self.fragment_digests))
        digest.update(str(self.outer_step).encode())
        digest.update(repr(sorted(self.positions.items())).encode())
        return self.island_digest(digest.hexdigest())

    def _hash_fragments(self, changed: Optional[list[int]] = None) -> None:
        momenta = _momenta(self.outer_optimizer)
        for fragment in range(len(self.fragments)) if changed is None else changed:
            digest = hashlib.sha256()
            for i in self.fragments[fragment].params:
                for tensor in [self.global_locals[i]] + ([momenta[i]] if momenta else []):
                    # hashlib reads host memory: a GPU tensor is copied over first
                    digest.update(tensor.detach().contiguous().view(torch.uint8).cpu().numpy())
            self.fragment_digests[fragment] = digest.digest()

    def _agree_hash(self, changed: Optional[list[int]] = None) -> str:
        digest = self._digest(changed)
        self.group.agree_hash(digest)
        return digest

    def _shared_tensors(self) -> list[torch.Tensor]:
        return list(self.global_locals) + _momenta(self.outer_optimizer)

    def _admit(self) -> None:
        """Members, at the end of a step: land everything in flight, take the joiners in and
        send them the shared state. Each member keeps its own local parameters."""
        for sync in list(self.in_flight):
            self._land(sync)
        joiners, self.joiners = self.joiners, {}
        source = self.group.admit(joiners, self.group.round)
        self._exchange_state(source)
        self.last_hash = self._agree_hash()

    def join(self, token: str, timeout_s: float) -> Optional[int]:
        """A restarted island: the shared state from a peer; returns the step to continue
        after, or None when the other islands finished the run meanwhile."""
        source = self.group.join(token, timeout_s)
        if source is None:
            return None
        self._exchange_state(source)
        with torch.no_grad():
            for i, g in enumerate(self.global_locals):
                local_view(self.params[i]).copy_(g)
                if self.starts:
                    self.starts[i].copy_(g)
            for e in self.error_locals:
                e.zero_()
        self.last_hash = self._agree_hash()
        return self.step

    @torch.no_grad()
    def start_from_model(self) -> None:
        """The global parameters become the (loaded) local ones; the outer state starts fresh."""
        for p, g in zip(self.params, self.global_locals):
            g.copy_(local_view(p))
        for start, g in zip(self.starts, self.global_locals):
            start.copy_(g)
        for momentum in _momenta(self.outer_optimizer):
            momentum.zero_()
        for e in self.error_locals:
            e.zero_()
        self.outer_step, self.positions, self.last_mean = 0, {}, {}
        self._hash_fragments()

    def _exchange_state(self, source: int) -> None:
        islands = self.group.islands
        header = torch.tensor([self.outer_step, self.step] +
                              [self.positions.get(i, -1) for i in range(islands)], dtype=torch.int64)
        self.group.broadcast([header] + self._shared_tensors(), source)
        self.outer_step, self.step = int(header[0]), int(header[1])
        self.positions = {i: int(v) for i, v in enumerate(header[2:].tolist()) if v >= 0}
        # Buffers are averaged at every sync; a joiner takes the source's.
        if self.buffers:
            self.group.broadcast(self.buffers, source)

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"outer_step": self.outer_step,
                                 "positions": {str(k): v for k, v in self.positions.items()},
                                 "global": dict(zip(self.names, self.global_params))}
        momenta = _momenta(self.outer_optimizer)
        if momenta:
            state["momentum"] = {n: _wrap(m, p) for n, m, p in zip(self.names, momenta, self.params)}
        if self.errors:
            state["error"] = dict(zip(self.names, self.errors))
        if self.delayed:  # each island's own round start and the last mean it estimates with
            state["start"] = {n: _wrap(t, p) for n, t, p in zip(self.names, self.starts, self.params)}
            state["last_mean"] = self._last_mean_per_param()
            state["last_mean_fragments"] = sorted(self.last_mean)
        if self.sent:  # the syncs in flight, sent again on resume
            state["in_flight"] = [[s.fragment, s.send_step, s.apply_step, s.position]
                                  for s in sorted(self.in_flight, key=lambda s: (s.send_step, s.fragment))]
            state["sent"] = dict(zip(self.names, self.sent))
            state["sent_buffers"] = dict(zip(self.buffer_names, self.sent_buffers))
            if self.sent_params:
                state["sent_params"] = dict(zip(self.names, self.sent_params))
        return state

    def _last_mean_per_param(self) -> dict[str, torch.Tensor]:
        per_param = [torch.zeros_like(g) for g in self.global_locals]
        for fragment, mean in self.last_mean.items():
            params = self.fragments[fragment].params
            for i, part in zip(params, _split(mean, [self.global_locals[i] for i in params])):
                per_param[i] = part.clone()
        return {n: _wrap(t, p) for n, t, p in zip(self.names, per_param, self.params)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer_step = int(state["outer_step"])
        self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        for name, g in zip(self.names, self.global_locals):
            g.copy_(local_view(state["global"][name]))
        if "momentum" in state:
            for name, g in zip(self.names, self.global_locals):
                self.outer_optimizer.state[g]["momentum_buffer"] = \
                    local_view(state["momentum"][name]).clone()
        for name, e in zip(self.names, self.error_locals):
            e.copy_(local_view(state["error"][name]))
        for name, start, g in zip(self.names, self.starts, self.global_locals):
            start.copy_(local_view(state["start"][name]) if "start" in state else g)
        self.last_mean = {}
        for fragment in state.get("last_mean_fragments", []):
            params = self.fragments[fragment].params
            self.last_mean[fragment] = _flat([local_view(state["last_mean"][self.names[i]]) for i in params])
        self._hash_fragments()
        self._load_in_flight(state)

    def _load_in_flight(self, state: dict[str, Any]) -> None:
        """Fill the slots and send the syncs that were in flight again, in the order they were
        first sent, so every island (all resume from the same step) pairs the same transfers."""
        if self.in_flight:
            raise DilocoError("cannot load a DiLoCo state while outer reductions are in flight")
        entries = state.get("in_flight", [])
        if entries and not self.sent:
            raise DilocoError("the saved DiLoCo state has reductions in flight, which this recipe "
                              "(no overlap, no delayed update) cannot continue")
        for key, slots in (("sent", self.sent), ("sent_params", self.sent_params)):
            for name, slot in zip(self.names, slots):
                if name in state.get(key, {}):
                    local_view(slot).copy_(local_view(state[key][name]))
        for name, slot in zip(self.buffer_names, self.sent_buffers):
            if name in state.get("sent_buffers", {}):
                slot.copy_(state["sent_buffers"][name])
        for fragment, send_step, apply_step, position in entries:
            self._send_again(int(fragment), int(send_step), int(apply_step), int(position))


def _like(param: torch.Tensor, zero: bool = False) -> torch.Tensor:
    local = local_view(param).detach()
    copy = torch.zeros_like(local, dtype=torch.float32) if zero else local.float().clone()
    return _wrap(copy, param)


def _wrap(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(like, DTensor):
        return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                                  shape=like.shape, stride=like.stride())
    return local


def _momenta(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    params = optimizer.param_groups[0]["params"]
    if not all("momentum_buffer" in optimizer.state.get(p, {}) for p in params):
        return []
    return [optimizer.state[p]["momentum_buffer"] for p in params]


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0)


def _split(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, offset = [], 0
    for t in like:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out
