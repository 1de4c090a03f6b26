"""Slowing a running process down from outside, as a throttled GPU or a noisy neighbour would.

Nothing in atoll is asked to be slow: the tests and benchmarks that need a
straggler act on a worker's process id (from the `workers` event) with
signals and CPU affinity, the way the fault happens in production.

- `duty_cycle(pid, stopped, period_s)`: SIGSTOP for `stopped` of every
  `period_s`, then SIGCONT; a step takes about 1 / (1 - stopped) as long
  (0.4 of 100 ms: ~1.6x), from a process of its own. Leaves the process
  running on exit.
- `shared_core(pid, core)`: pins the process to one core beside a busy loop
  pinned there too, so it gets about half of that core; restores the
  process's affinity and ends the loop on exit.
- `one_core_each(pids)`: pins each process to a core of its own while the
  block runs, as ranks on devices of their own are.
- `spares_warm(root)`: whether the warm spare actors under a Ray cluster's
  process `root` have imported torch; the straggler policy scores nothing
  before, so a slowdown is started after.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Iterator


def slowdown_fraction(factor: float) -> float:
    """The share of each period a process must be stopped to run `factor` times slower."""
    if factor < 1:
        raise ValueError(f"a slowdown factor is at least 1, got {factor}")
    return 1 - 1 / factor


# The duty cycle's own process: a real-time priority where allowed (root), so that the
# stops end on time on cores that the training saturates; its timing would otherwise
# depend on when the scheduler (and a thread, the caller's GIL) lets it run: a SIGCONT
# late by a scheduler slice stretches a 4 ms stop into tens of ms, or, inside a
# collective, stalls both ranks.
_CYCLE = """
import os, signal, sys, time
pid, stopped, period = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
except PermissionError:
    pass
print("cycling", flush=True)  # the caller's block starts now, not at this interpreter's start
next_start = time.monotonic()
try:
    while True:
        if stopped:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(period * stopped)
        os.kill(pid, signal.SIGCONT)
        next_start += period
        time.sleep(max(0.0, next_start - time.monotonic()))
except ProcessLookupError:
    pass
"""


@contextlib.contextmanager
def duty_cycle(pid: int, stopped: float, period_s: float = 0.1) -> Iterator[None]:
    """Stop `pid` for `stopped` of every `period_s` while the block runs (from a process of
    its own, see `_CYCLE`, cycling when the block starts)."""
    if not 0 <= stopped < 1:
        raise ValueError(f"the stopped share must be in [0, 1), got {stopped}")
    cycle = subprocess.Popen([sys.executable, "-c", _CYCLE, str(pid), str(stopped), str(period_s)],
                             stdout=subprocess.PIPE, text=True)
    try:
        cycle.stdout.readline()  # started (a Python start takes a few of a small model's steps)
        yield
    finally:
        cycle.kill()
        cycle.wait()
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


@contextlib.contextmanager
def one_core_each(pids: list[int]) -> Iterator[None]:
    """Pin every thread of each process of `pids` to a core of its own (the i-th to core i),
    as ranks on devices of their own are: a duty-cycled process woken 100 times a second is
    otherwise often placed on a peer's core and takes its time there. Restored on exit."""
    before = {}
    for core, pid in enumerate(pids):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                before[int(task)] = os.sched_getaffinity(int(task))
                os.sched_setaffinity(int(task), {core})
    try:
        yield
    finally:
        for task, cores in before.items():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                os.sched_setaffinity(task, cores)


def spares_warm(root: int, ranks: int = 2) -> bool:
    """Whether the warm spares of a group of `ranks` ranks, among the processes under `root`
    (the process that started the Ray cluster), have started and imported torch: the
    straggler policy holds its scores until then. Seen from outside: Ray titles an actor's
    process after the method it runs (`ray::TrainWorker.warm_up`)."""
    import psutil

    titles = []
    for proc in psutil.Process(root).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            titles.append(" ".join(proc.cmdline()))
    workers = [t for t in titles if "ray::TrainWorker" in t]
    return len(workers) > ranks and not any("warm_up" in t for t in workers)
