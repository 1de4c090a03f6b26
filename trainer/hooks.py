"""Step hooks: what the train loop does around each optimizer step besides training.

The loop (`Trainer.run`) calls every hook in order: `before_optimizer_step`
once the gradients are final (a copy of the state that is still being taken
must finish before the step mutates it), `after_step` once the step counter
has advanced, and `close` at the end. Disk checkpoints, memory snapshots,
metrics and the heartbeat to the launcher are hooks; DiLoCo's outer sync is
one more. `RunControl` is what a launcher hands to `train()`: a snapshot
store, a heartbeat sink and a stop request, all optional, none of them Ray
(the launcher wraps its own machinery in these plain callables).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from atoll.parallel.wait_clock import StepTimes
from atoll.trainer.evaluation import evaluate

if TYPE_CHECKING:
    from atoll.checkpoint.snapshot_store import SnapshotStore
    from atoll.trainer.train import StepResult, Trainer


# A stop request that only restarts the group on another layout (no disk checkpoint needed).
RESIZE = "resize"


@dataclass
class RunControl:
    """The launcher's side of a run, as plain objects.

    - `snapshot_store`: where memory snapshots go (None: no memory tier).
    - `heartbeat(info)`: called after every step with the step, samples and
      how the run started (resumed step and source), so a supervisor can
      tell progress from a hang.
    - `attempt`: which start of the run this is; a restart never refuses
      the run directory its own earlier attempt wrote.
    - `stop_request()`: falsy until the launcher wants the run to stop cleanly
      at the next step boundary, then why: `RESIZE` (to grow the group back:
      a memory snapshot is enough) or a signal's name such as "SIGTERM"
      (the run ends: a disk checkpoint is committed first). Ranks see the
      request at different moments; the loop agrees on the step through its
      per-step all-reduce.
    - `rejoin_token`: set when the launcher restarted one lost DiLoCo island
      while the others went on: the island takes the shared state from a
      peer instead of resuming from a checkpoint (the token names this try).
    """

    snapshot_store: Optional["SnapshotStore"] = None
    attempt: int = 0  # > 0: a restart of this run, which continues it (also with nothing to resume)
    heartbeat: Optional[Callable[[dict], None]] = None
    stop_request: Optional[Callable[[], Any]] = None
    rejoin_token: Optional[str] = None


class StopAgreement:
    """Whether, and after which step, the loop stops before its last step; the same on every rank.

    Every step each rank offers two flags on the step's all-reduce (`offer`): it was asked
    to stop, and that request ends the run (a signal, not a resize). `agree` takes the
    world's sums, so a rank that saw no request itself stops at the same step as the rest.
    """

    def __init__(self, control: RunControl):
        self.control = control
        self.after: Optional[int] = None  # the step the loop stops after
        self.final = False  # that stop ends the run: a disk checkpoint is committed there
        self.reason: Optional[str] = None  # the signal's name, as far as this rank knows it
        self._request: Any = None

    def offer(self) -> tuple[float, float]:
        request = self.control.stop_request() if self.control.stop_request is not None else None
        self._request = request
        return float(bool(request)), float(bool(request) and request != RESIZE)

    def agree(self, step: int, stops: float, final_stops: float) -> None:
        if stops and self.after is None:
            self.after = step
        if final_stops and not self.final:
            self.after, self.final = step, True
            self.reason = self._request if self._request and self._request != RESIZE else "signal"

    def ends_run_at(self, step: int) -> bool:
        return self.final and step == self.after


class StepHook:
    """One concern of the loop; every method is optional."""

    def before_optimizer_step(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        pass

    def close(self, trainer: "Trainer", clean: bool) -> None:
        """`clean=False` on the error path: no collectives, a peer may be gone."""


class DiskCheckpointHook(StepHook):
    """Asynchronous disk checkpoints every `checkpoint.interval` steps and at the end."""

    def before_optimizer_step(self, trainer: "Trainer") -> None:
        trainer.checkpointer.wait_staging()

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        ckpt = trainer.checkpointer
        ckpt.poll()
        if trainer.disk_checkpoint_due():
            ckpt.save(trainer.step, trainer.states, trainer.loader.samples_consumed)


class MemorySnapshotHook(StepHook):
    """Snapshots into the launcher's store every `checkpoint.memory_interval` steps; with
    `auto`, every step until the interval is chosen, which is then reported once."""

    def before_optimizer_step(self, trainer: "Trainer") -> None:
        trainer.snapshotter.wait_copied()

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        snap = trainer.snapshotter
        choice = snap.choose_interval()
        if choice is not None:
            fields = {"interval": choice.interval, "snapshot_s": round(choice.snapshot_s, 6),
                      "step_s": round(choice.step_s, 6)}
            trainer.island_event("memory_interval", step=trainer.step, **fields)
            if trainer.is_logging_rank:
                print(f"memory snapshots every {choice.interval} step{'s' * (choice.interval > 1)} "
                      f"(checkpoint.memory_interval=auto: {choice.snapshot_s * 1e3:.1f} ms per snapshot, "
                      f"{choice.step_s * 1e3:.1f} ms per step; at most 5% of the step time)", flush=True)
        if snap.due(trainer.step) or trainer.at_boundary():
            snap.save(trainer.step, trainer.states, trainer.snapshot_extra())

    def close(self, trainer: "Trainer", clean: bool) -> None:
        trainer.snapshotter.close(wait_for_peers=clean)


class DilocoHook(StepHook):
    """DiLoCo's outer steps (syncs that land, syncs that start), before anything logs or
    saves; at the last step every fragment lands so the final model is the global one."""

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        diloco, position = trainer.diloco, trainer.loader.samples_consumed
        end = trainer.step == trainer.cfg.run.steps
        events = diloco.after_inner_step(trainer.step, position,
                                         land_all=not end and trainer.at_boundary())
        if end:
            events += diloco.finish(trainer.step, position)
        for change in trainer.outer.take_changes():
            trainer.island_event("membership", outer_step=diloco.outer_step, **change)
        for fields in events:
            trainer.island_event("outer_step", **fields)
            if trainer.env.is_island_lead:  # the rank that writes the event says it on the console too
                # One write with its newline: unbuffered, print() writes the newline apart, and
                # the islands' lines could run into each other on a shared terminal.
                sys.stdout.write(outer_step_line(trainer.env.island, fields, trainer.cfg.diloco.fragments) + "\n")
                sys.stdout.flush()


def outer_step_line(island: int, fields: dict, fragments: int) -> str:
    """One console line per outer step of an island, from its `outer_step` event's fields."""
    fragment = f" (fragment {fields['fragment']})" if fragments > 1 else ""
    return (f"island {island}: outer step {fields['outer_step']}{fragment} | {fields['islands']} islands"
            f" | {fields['bytes_sent'] / 1e6:.2f} MB sent | {fields['seconds']:.2f} s"
            f" | state {fields['state_sha256'][:12]}")


class MetricsHook(StepHook):
    """metrics.jsonl, progress and eval on log steps."""

    def __init__(self) -> None:
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.last: dict[str, Any] = {}

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        self.interval_steps += 1
        cfg, step = trainer.cfg, trainer.step
        end = step == trainer.last_step
        log_now = step % cfg.logging.log_interval == 0 or trainer.at_boundary()
        eval_now = bool(trainer.val) and (step % cfg.logging.eval_interval == 0 or end)
        if not (log_now or eval_now):
            return
        elapsed = time.perf_counter() - self.interval_start
        self.last = trainer.step_metrics(result, self.interval_steps, elapsed)
        if eval_now:
            self.last.update(evaluate(trainer))
        trainer.logger.log(step, self.last)
        self.interval_start, self.interval_steps = time.perf_counter(), 0


class StartupTimes:
    """How long this process took to start training, phase by phase, for the launcher's
    `restart` breakdown: rendezvous (process group), build (model, optimizer, data),
    restore (snapshot or checkpoint) and first_step (until the first step completed).
    `entered_at` is the wall-clock time the process began building its trainer."""

    def __init__(self) -> None:
        self.entered_at = time.time()
        self._mark = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """The time since the previous lap counts towards `phase`."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._mark
        self._mark = now

    def as_beat(self) -> dict:
        return {"entered_at": self.entered_at, **{k: round(v, 4) for k, v in self.phases.items()}}


class HeartbeatHook(StepHook):
    """Tells the launcher each completed step, and how long this rank computed and waited
    for its peers in each of the last steps (`compute_s`, `wait_s`: oldest first, the last
    entry is `step`'s), where it sits (`stage`, `island`: ranks that do the same work
    share both), so that the supervisor can find a straggler without a collective; and
    how the start went (`startup`, phase by phase)."""

    def __init__(self, control: RunControl):
        self.control = control
        self.times = StepTimes()

    def beat(self, trainer: "Trainer") -> None:
        if self.control.heartbeat is not None:
            self.control.heartbeat({"step": trainer.step, "samples": trainer.loader.samples_consumed,
                                    "time": time.time(), "resumed_step": trainer.resumed_step,
                                    "resume_source": trainer.resume_source,
                                    "compute_s": list(self.times.compute_s), "wait_s": list(self.times.wait_s),
                                    "stage": trainer.mesh.pp_rank, "island": trainer.env.island,
                                    "startup": trainer.startup.as_beat()})

    def started(self, trainer: "Trainer") -> None:
        """The loop is about to take its first step: the first step's time starts now."""
        self.times.start()
        self.beat(trainer)

    def after_step(self, trainer: "Trainer", result: "StepResult") -> None:
        self.times.lap()
        if "first_step" not in trainer.startup.phases:
            trainer.startup.lap("first_step")
        self.beat(trainer)
