"""How long this process waited for its peers: the split of a step into compute and wait.

In synchronous training a slow rank shows as long compute on itself and long
collective waits on the others, so a straggler is found by its compute time,
not its step time. This module keeps one per-process clock of "time blocked
waiting for peers", fed from the blocking points of a step, and `StepTimes`
turns it into per-step (compute_s, wait_s) with compute_s = wall - wait_s.
It runs no collective and no host sync of its own, and knows nothing of the
train loop or the launcher; the heartbeat (trainer/hooks.py) carries the
figures to the supervisor.

What is counted as waiting, where:
- `clip_grad_norm`'s all-reduce (gradient norm, loss and stop flags), the MoE
  load reduction (`reduce_moe_load`) and the expert-gradient all-reduce
  (`sync_expert_grads`): the whole call (`waiting`).
- Expert-parallel all-to-all: the split-size exchange, whose host read is the
  first point where this rank waits for the others in each MoE layer.
- DDP: a comm hook (`timed_allreduce_hook`) wraps the default all-reduce and
  notes when each bucket became ready locally; the time from the last bucket's
  readiness to the end of backward (DDP's finalisation waits there for the
  all-reduces, i.e. for the slowest peer's last bucket) is waiting. Earlier
  buckets overlap with compute and cost nothing.
- FSDP2: each parameter group's `unshard` and `wait_for_unshard` (the
  all-gather of the parameters, before forward and before backward, and its
  prefetch; on gloo it is synchronous, in `unshard`) and `post_backward` (the
  gradient reduce-scatter, issued and, on gloo, finished there) are waiting
  (`time_fsdp_waits`). The copy in and out of the communication buffers is
  counted with them (small next to the collective).
- Not counted: pipeline send/receive waits (inside torch's schedule; a stage
  downstream of a slow rank counts them as compute, so stages are compared
  only with the same stage of other replicas), the evaluation and log-step
  gathers (rare: the scoring's rolling median ignores them).

On the CPU (gloo) every one of these points blocks the host, so host time
(`time.perf_counter`) is the truth. On CUDA the host runs ahead of the device
and blocks only where a value is read (the step's `.tolist()` of the
all-reduce), so host time would put a rank's own queued kernels into its
wait. There each waiting interval is instead bracketed by two CUDA events on
the current stream (the time the compute stream stalls on a collective or a
stream wait), read back only once they have completed (`Event.query()`,
which does not block): after the step's own host sync they have, so a step's
waits are counted at its heartbeat. The DDP and FSDP reduce-scatter waits
run on side streams and stall the compute stream only at the end of
backward; that stall falls into the next bracketed collective or, where
none is, into compute.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Iterator, Optional, Union

import torch

Mark = Union[float, "torch.cuda.Event"]
KEEP_STEPS = 32  # per-step figures a heartbeat carries
_MAX_PENDING = 4096  # CUDA event pairs not read yet: never grow without bound


class WaitClock:
    """Seconds this process spent blocked on its peers since the last `take`."""

    def __init__(self) -> None:
        self.host_s = 0.0
        self.pending: list[tuple["torch.cuda.Event", "torch.cuda.Event"]] = []

    def mark(self, device: Optional[torch.device]) -> Mark:
        """A point in time: host seconds, or on CUDA an event on the current stream."""
        if device is not None and device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            return event
        return time.perf_counter()

    def add(self, start: Mark, end: Mark) -> None:
        if isinstance(start, float) and isinstance(end, float):
            self.host_s += max(0.0, end - start)
        elif not isinstance(start, float) and not isinstance(end, float):
            if len(self.pending) < _MAX_PENDING:
                self.pending.append((start, end))

    @contextlib.contextmanager
    def waiting(self, device: Optional[torch.device] = None) -> Iterator[None]:
        start = self.mark(device)
        try:
            yield
        finally:
            self.add(start, self.mark(device))

    def take(self) -> float:
        """The waiting counted since the last call (CUDA intervals once they have completed)."""
        total, self.host_s = self.host_s, 0.0
        unread = []
        for start, end in self.pending:
            if end.query():  # completed: reading it does not block
                total += start.elapsed_time(end) / 1000.0
            else:
                unread.append((start, end))
        self.pending = unread
        return total


CLOCK = WaitClock()  # one per process: a process is one rank


def waiting(device: Optional[torch.device] = None):
    """Context: the enclosed code waits for peers (a collective and its result)."""
    return CLOCK.waiting(device)


class StepTimes:
    """Per-step (compute_s, wait_s) of the last `KEEP_STEPS` steps, oldest first.

    A step's wall time runs from the previous `lap` (or `start`) to this one, so
    the work around a step (hooks, snapshots) counts as this rank's compute."""

    def __init__(self, keep: int = KEEP_STEPS):
        self.compute_s: deque[float] = deque(maxlen=keep)
        self.wait_s: deque[float] = deque(maxlen=keep)
        self._last: Optional[float] = None

    def start(self) -> None:
        CLOCK.take()  # waits before the first step (rendezvous, restore) belong to no step
        self._last = time.perf_counter()

    def lap(self) -> None:
        now = time.perf_counter()
        if self._last is None:
            self.start()
            return
        wall = now - self._last
        wait = min(CLOCK.take(), wall)
        self.compute_s.append(round(wall - wait, 6))
        self.wait_s.append(round(wait, 6))
        self._last = now


# ------------------------------------------------------------------ data-parallel wrappers

def timed_allreduce_hook(state, bucket):
    """DDP comm hook: torch's default all-reduce, noting when each bucket was ready here.

    At the first bucket of a backward it queues a callback for the end of that
    backward (it runs after DDP's own, which waits for the all-reduces): the
    time from the last bucket's readiness to then is this rank's wait."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    group, timing = state
    device = bucket.buffer().device
    timing["ready"] = CLOCK.mark(device)
    if not timing.get("queued"):
        timing["queued"] = True
        engine = torch.autograd.Variable._execution_engine

        def backward_done() -> None:
            timing["queued"] = False
            CLOCK.add(timing.pop("ready"), CLOCK.mark(device))

        # DDP queues its own finalisation (the wait for the all-reduces) once the last
        # bucket is ready, after this callback: a callback queued from this one runs last.
        engine.queue_callback(lambda: engine.queue_callback(backward_done))
    return allreduce_hook(group, bucket)


def time_ddp_waits(ddp_module, process_group) -> None:
    """Register `timed_allreduce_hook` on a DistributedDataParallel module."""
    ddp_module.register_comm_hook((process_group, {}), timed_allreduce_hook)


def time_fsdp_waits(modules) -> None:
    """Count every FSDP2 parameter group's unshard wait and post-backward reduce-scatter
    of `modules` (fully_shard'ed) as waiting; a torch without these internals is left alone."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fully_shard import fully_shard

    for module in modules:
        if not isinstance(module, FSDPModule):
            continue
        state = fully_shard.state(module)
        groups = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.12: a list
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for name in ("unshard", "wait_for_unshard", "post_backward"):
                method = getattr(group, name, None)
                if method is not None and not getattr(method, "_atoll_timed", False):
                    setattr(group, name, _timed(method, group.device))


def _timed(method, device):
    def timed(*args, **kwargs):
        with waiting(device):
            return method(*args, **kwargs)
    timed._atoll_timed = True
    return timed
