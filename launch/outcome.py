"""How a run ends, as its user sees it: the last console line, `stop` and `run_end` events, the exit code.

One `RunOutcome` per invocation of `atoll train`, in the process that speaks
for the run: the Ray driver, the local process, or rank 0 under torchrun
(the other ranks get a silent one). Training code never writes these
events; it returns what a signal's stop left (`result["stop"]`: signal,
step, checkpoint) and the launcher reports it here.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Optional

from atoll.checkpoint.store import step_dir_name
from atoll.launch.signals import GracefulStop, exit_code
from atoll.trainer.metrics import EVENTS_FILE, METRICS_FILE, read_jsonl, record_event

RERUN = "rerun the same command to continue"


def _signum(name: Optional[str]) -> int:
    try:
        return int(signal.Signals[name or ""])
    except KeyError:  # the stop reached this rank through its peers: a scheduler's SIGTERM
        return int(signal.SIGTERM)


class RunOutcome:
    def __init__(self, run_dir: Path, checkpoints: Path, enabled: bool = True):
        self.run_dir, self.checkpoints = Path(run_dir), Path(checkpoints)
        self.enabled = enabled
        self.started = time.time()

    def _last_step(self) -> int:
        rows = read_jsonl(self.run_dir / METRICS_FILE)
        return int(rows[-1]["step"]) if rows else 0

    def _newest_checkpoint(self) -> Optional[str]:
        from atoll.checkpoint.store import committed

        found = committed(self.checkpoints)
        return str(found[-1][1]) if found else None

    def _event(self, event: str, /, **fields) -> None:
        # Only a run that got as far as its run directory has events to add to.
        if self.enabled and (self.run_dir / EVENTS_FILE).exists():
            record_event(self.run_dir, event, **fields)

    def end(self, status: str, steps: Optional[int] = None) -> None:
        """`run_end`: done | failed | stopped, the step reached, wall time of this invocation."""
        self._event("run_end", status=status, steps=self._last_step() if steps is None else steps,
                    wall_s=round(time.time() - self.started, 3))

    def finished(self, results: list[dict]) -> int:
        """The ranks returned: a normal end (exit 0) or a signal's stop (exit 128 + signal)."""
        stops = [r["stop"] for r in results if r.get("stop")]
        steps = max((int(r.get("step", 0)) for r in results), default=0)
        if not stops:
            self.end("done", steps)
            return 0
        stop = stops[0]
        signum = _signum(stop.get("signal"))
        if stop.get("from_memory"):  # the step in progress was given up; its predecessor was saved
            saved = self.checkpoints / step_dir_name(stop["step"])
            stop["checkpoint"] = str(saved) if saved.is_dir() else None
            stop["error"] = stop.get("error") or "the snapshot's checkpoint did not commit"
        if stop.get("checkpoint"):
            source = (" (the newest memory snapshot: the step in progress did not end in time)"
                      if stop.get("from_memory") else "")
            line = (f"stopped at step {stop['step']}{source}: checkpoint {Path(stop['checkpoint']).name} "
                    f"saved; {RERUN}")
            reason = "memory snapshot" if stop.get("from_memory") else "signal"
        else:
            line = (f"stopped at step {stop['step']} without a new checkpoint ({stop.get('error')}); "
                    f"{self._from_newest()}")
            reason = "checkpoint failed"
        self._stopped(line, signum, stop["step"], stop.get("checkpoint"), reason)
        return exit_code(signum)

    def incomplete(self, stop: GracefulStop, why: str) -> int:
        """A stop that could not commit (grace over, a rank lost, a second signal)."""
        signum = stop.signum or int(signal.SIGINT)
        step = self._last_step()
        self._stopped(f"stopped without a new checkpoint: {why}; {self._from_newest()}", signum,
                      step, None, why)
        return exit_code(signum)

    def _from_newest(self) -> str:
        newest = self._newest_checkpoint()
        return f"{RERUN} from {Path(newest).name}" if newest else "no checkpoint to continue from"

    def _stopped(self, line: str, signum: int, step: int, checkpoint: Optional[str], reason: str) -> None:
        if not self.enabled:
            return
        self._event("stop", signal=signal.Signals(signum).name, step=step, checkpoint=checkpoint,
                    reason=reason)
        self.end("stopped", step)
        print(f"atoll: {line}", file=sys.stderr, flush=True)
