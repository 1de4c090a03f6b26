"""Slowing a running process down from outside, as a throttled GPU or a noisy neighbour would.

Nothing in atoll is asked to be slow: the tests and benchmarks that need a
straggler act on a worker's process id (from the `workers` event) with
signals and CPU affinity, the way the fault happens in production.

- `duty_cycle(pid, stopped, period_s)`: SIGSTOP for `stopped` of every
  `period_s`, then SIGCONT; a step takes about 1 / (1 - stopped) as long
  (0.4 of 100 ms: ~1.6x). Leaves the process running on exit.
- `shared_core(pid, core)`: pins the process to one core beside a busy loop
  pinned there too, so it gets about half of that core; restores the
  process's affinity and ends the loop on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator


def slowdown_fraction(factor: float) -> float:
    """The share of each period a process must be stopped to run `factor` times slower."""
    if factor < 1:
        raise ValueError(f"a slowdown factor is at least 1, got {factor}")
    return 1 - 1 / factor


@contextlib.contextmanager
def duty_cycle(pid: int, stopped: float, period_s: float = 0.1) -> Iterator[None]:
    """Stop `pid` for `stopped` of every `period_s` while the block runs."""
    if not 0 <= stopped < 1:
        raise ValueError(f"the stopped share must be in [0, 1), got {stopped}")
    done = threading.Event()

    def cycle() -> None:
        next_start = time.monotonic()
        while not done.is_set():
            try:
                if stopped:
                    os.kill(pid, signal.SIGSTOP)
                    done.wait(period_s * stopped)
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            next_start += period_s
            done.wait(max(0.0, next_start - time.monotonic()))

    thread = threading.Thread(target=cycle, name=f"duty-cycle-{pid}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def shared_core(pid: int, core: int = 0) -> Iterator[None]:
    """Pin `pid` to `core` beside a busy loop pinned to the same core."""
    before = os.sched_getaffinity(pid)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {core})
        os.sched_setaffinity(pid, {core})
        yield
    finally:
        busy.kill()
        busy.wait()
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(pid, before)
