"""DiLoCo: islands of compute that train one model and talk only every H steps.

Each island is a replica of the whole pp × dp × ep layout with its own
process group (parallel/layout.py) and its own data stream. Every
`diloco.inner_steps` (H) steps the islands average their pseudo-gradients
(global − local parameters) and an outer optimizer (SGD, Nesterov momentum
by default) moves the global parameters; every island then continues from
them. The global parameters, the outer optimizer's state and the outer step
are `Stateful` here, so checkpoints and snapshots hold them like any other
state.

Communication between islands goes through an `OuterGroup`: one gloo group
per in-island rank, joining the ranks that hold the same shard in every
island, built on the run's store so that it never shares a connection with
the islands' own collectives. Pseudo-gradients travel as fp32 (the mean of
the local parameters, exact), bf16, int8 (absmax scale per row) or int4
(scale per group, error feedback kept per island). With a lossy encoding
every island, the sender included, decodes every island's payload and sums
them in island order, so all islands end an outer step with bit-identical
global state; a sha256 of that state is compared across islands after every
outer step, and a mismatch is an error naming the island.

This module knows parameters and process groups; it knows nothing of the
model's structure, of checkpoints' files or of the launcher.
"""

from __future__ import annotations

import datetime
import hashlib
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

INT8_ROW = 512  # values per int8 scale


class DilocoError(RuntimeError):
    """The islands' shared state diverged or an outer reduction failed; names the island."""


def local_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


# --------------------------------------------------------------------------- encodings


class Codec:
    """How a flat fp32 pseudo-gradient goes on the wire; `none` is exact fp32."""

    name = "none"
    lossy = False

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.view(torch.float32)[:numel]


class Bf16Codec(Codec):
    name, lossy = "bf16", True

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.view(torch.bfloat16)[:numel].float()


class Int8Codec(Codec):
    """Per-row absmax: row r is stored as round(x / s_r) with s_r = max|x_r| / 127."""

    name, lossy = "int8", True

    def __init__(self, row: int = INT8_ROW):
        self.row = row

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        rows = _padded(flat, self.row)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        # The padding of the last row is not sent.
        return torch.cat([scale.view(torch.uint8).flatten(), q.view(torch.uint8).flatten()[:flat.numel()]])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nrows = -(-numel // self.row)
        scale = payload[:4 * nrows].view(torch.float32).view(nrows, 1)
        q = _padded(payload[4 * nrows:].view(torch.int8).float(), self.row)
        return (q * scale).flatten()[:numel]


class Int4Codec(Codec):
    """Groups of `group` values, two per byte, scale max|x| / 7 per group (bf16)."""

    name, lossy = "int4", True

    def __init__(self, group: int = 64):
        self.group = group

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        groups = _padded(flat, self.group)
        scale = (groups.abs().amax(dim=1, keepdim=True) / 7).to(torch.bfloat16)
        safe = scale.float().clamp_min(1e-30)
        q = (torch.round(groups / safe).clamp_(-7, 7) + 8).to(torch.uint8).flatten()
        q = q[:flat.numel() + flat.numel() % 2]  # the padding of the last group is not sent
        packed = q[0::2] | (q[1::2] << 4)
        return torch.cat([scale.view(torch.uint8).flatten(), packed])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        ngroups = -(-numel // self.group)
        scale = payload[:2 * ngroups].view(torch.bfloat16).float().view(ngroups, 1)
        packed = payload[2 * ngroups:]
        q = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int16) - 8
        return (_padded(q.float(), self.group) * scale).flatten()[:numel]


def _padded(flat: torch.Tensor, width: int) -> torch.Tensor:
    pad = (-flat.numel()) % width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, width)


def make_codec(name: str, int4_group: int = 64) -> Codec:
    return {"none": Codec, "bf16": Bf16Codec, "int8": Int8Codec,
            "int4": lambda: Int4Codec(int4_group)}[name]()


# --------------------------------------------------------------------------- the outer group


class OuterGroup:
    """This rank and its counterparts (same in-island rank) in every island.

    Counts the bytes this rank sends, with the ring algorithms' volumes, and
    throttles to `bandwidth_mbit` when asked, so that a benchmark projects
    onto islands joined by a slow link.
    """

    def __init__(self, store: dist.Store, island: int, islands: int, in_island_rank: int,
                 timeout_s: float, bandwidth_mbit: float = 0.0):
        self.island, self.islands = island, islands
        self.bandwidth_mbit = bandwidth_mbit
        prefix = f"atoll/outer/rank-{in_island_rank}/epoch-0"
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), island, islands,
                                        datetime.timedelta(seconds=timeout_s))
        self.bytes_sent = 0

    def _sent(self, nbytes: float) -> None:
        self.bytes_sent += int(nbytes)
        if self.bandwidth_mbit:
            time.sleep(nbytes * 8 / (self.bandwidth_mbit * 1e6))

    def all_reduce_mean(self, flat: torch.Tensor) -> torch.Tensor:
        self.pg.allreduce([flat]).wait()
        self._sent(2 * (self.islands - 1) / self.islands * flat.numel() * flat.element_size())
        return flat.div_(self.islands)

    def all_gather(self, payload: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(payload) for _ in range(self.islands)]
        self.pg.allgather([out], [payload]).wait()
        self._sent((self.islands - 1) * payload.numel())
        return out

    def barrier(self) -> None:
        self.pg.allreduce([torch.zeros(1)]).wait()

    def close(self) -> None:
        self.pg = None  # gloo closes its connections when the group is released

    def take_bytes(self) -> int:
        value, self.bytes_sent = self.bytes_sent, 0
        return value


# --------------------------------------------------------------------------- the algorithm


class DiLoCo:
    """Global parameters, the outer optimizer and the outer step of one rank's shard.

    `params` are this rank's (name, parameter) pairs; `buffers` the state
    that is not a parameter but must agree across islands (the aux-free
    expert bias), averaged at every outer step.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], buffers: list[tuple[str, torch.Tensor]],
                 group: OuterGroup, *, inner_steps: int, outer_lr: float, outer_momentum: float,
                 nesterov: bool, codec: Codec):
        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]
        self.buffers = buffers
        self.group, self.codec = group, codec
        self.inner_steps = inner_steps
        self.lr, self.momentum = outer_lr, outer_momentum
        # Global copies with the parameters' placements, so that DCP reshards them like the model.
        self.global_params = [_like(p) for p in self.params]
        self.outer_optimizer = torch.optim.SGD(
            [local_view(g) for g in self.global_params], lr=outer_lr, momentum=outer_momentum,
            nesterov=nesterov and outer_momentum > 0)
        self.errors = [_like(p, zero=True) for p in self.params] if codec.name == "int4" else []
        self.outer_step = 0
        self.last_hash = ""

    def due(self, step: int) -> bool:
        return step > 0 and step % self.inner_steps == 0

    @torch.no_grad()
    def sync(self, samples_consumed: int) -> dict[str, Any]:
        """One outer step; returns the fields of its `outer_step` event."""
        started = time.perf_counter()
        locals_ = [local_view(p) for p in self.params]
        globals_ = [local_view(g) for g in self.global_params]
        if self.codec.lossy:
            deltas = self._reduce_lossy(locals_, globals_)
        else:
            mean = self.group.all_reduce_mean(_flat(locals_))
            averaged = _split(mean, locals_)
            deltas = None if self._is_average() else [g - a for g, a in zip(globals_, averaged)]
        if deltas is None:  # outer lr 1 without momentum: the new global is the average itself
            for g, a in zip(globals_, averaged):
                g.copy_(a)
        else:
            for g, d in zip(globals_, deltas):
                g.grad = d
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
        for p, g in zip(locals_, globals_):
            p.copy_(g)
        if self.buffers:
            flat = self.group.all_reduce_mean(_flat([b for _, b in self.buffers]))
            for (_, b), mean_b in zip(self.buffers, _split(flat, [b for _, b in self.buffers])):
                b.copy_(mean_b)
        self.outer_step += 1
        self.last_hash = self._check_hash(samples_consumed)
        return {"outer_step": self.outer_step, "islands": self.group.islands,
                "seconds": round(time.perf_counter() - started, 4), "state_sha256": self.last_hash}

    def _is_average(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def _reduce_lossy(self, locals_: list, globals_: list) -> list[torch.Tensor]:
        """Mean pseudo-gradient, decoded from every island's payload (its own included)."""
        flat = _flat([g - p for g, p in zip(globals_, locals_)])
        if self.errors:
            flat += _flat([local_view(e) for e in self.errors])
        payloads = self.group.all_gather(self.codec.encode(flat))
        decoded = [self.codec.decode(payload, flat.numel()) for payload in payloads]
        if self.errors:  # what this island's payload failed to carry goes out next time
            residual = _split(flat - decoded[self.group.island], globals_)
            for e, r in zip(self.errors, residual):
                local_view(e).copy_(r)
        total = decoded[0].clone()
        for other in decoded[1:]:
            total += other
        return _split(total.div_(self.group.islands), globals_)

    def _check_hash(self, samples_consumed: int) -> str:
        """sha256 of the shared state, equal on every island or a DilocoError naming the one that differs."""
        positions = torch.tensor([samples_consumed], dtype=torch.int64)
        every = self.group.all_gather(positions.view(torch.uint8))
        digest = hashlib.sha256()
        for tensor in [local_view(g) for g in self.global_params] + _momenta(self.outer_optimizer):
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
        digest.update(str(self.outer_step).encode())
        for blob in every:
            digest.update(blob.numpy().tobytes())
        mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)
        hashes = self.group.all_gather(mine)
        for island, other in enumerate(hashes):
            if not torch.equal(other, hashes[0]):
                raise DilocoError(f"DiLoCo state diverged at outer step {self.outer_step}: island "
                                  f"{island}'s sha256 differs from island 0's")
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return digest.hexdigest()
        pieces = [None] * dist.get_world_size()  # the island's ranks (its own process group)
        dist.all_gather_object(pieces, digest.hexdigest())
        return hashlib.sha256("".join(pieces).encode()).hexdigest()

    # ------------------------------------------------------------------ Stateful

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"outer_step": self.outer_step,
                                 "global": dict(zip(self.names, self.global_params))}
        momenta = _momenta(self.outer_optimizer)
        if momenta:
            state["momentum"] = {n: _wrap(m, p) for n, m, p in zip(self.names, momenta, self.params)}
        if self.errors:
            state["error"] = dict(zip(self.names, self.errors))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer_step = int(state["outer_step"])
        for name, g in zip(self.names, self.global_params):
            local_view(g).copy_(local_view(state["global"][name]))
        if "momentum" in state:
            for name, g in zip(self.names, self.outer_optimizer.param_groups[0]["params"]):
                self.outer_optimizer.state[g]["momentum_buffer"] = \
                    local_view(state["momentum"][name]).clone()
        for name, e in zip(self.names, self.errors):
            local_view(e).copy_(local_view(state["error"][name]))


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
