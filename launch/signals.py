"""SIGINT and SIGTERM: stop at a step boundary with a checkpoint, or abort on a second.

Clouds preempt with SIGTERM and a grace period; Ctrl-C, torchrun and `ray job
stop` send SIGINT or SIGTERM too. A `GracefulStop` turns the first such
signal into a request the run polls (the train loop through
`RunControl.stop_request`, the Ray supervisor through its poll loop): stop
after the step in progress and commit a disk checkpoint. A second signal
raises KeyboardInterrupt at once: the newest committed checkpoint is left
as it was. Past `fault_tolerance.stop_grace_s` a stop that has not finished
gives up on the new checkpoint.

The exit code of a stopped run is 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    return 128 + signum


class GracefulStop:
    """The first SIGINT/SIGTERM asks for a stop; a second aborts (KeyboardInterrupt)."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None
        self.on_expired: Optional[Callable[[], None]] = None

    def reason(self) -> Optional[str]:
        """What `RunControl.stop_request` returns: the signal's name once one arrived."""
        return signal.Signals(self.signum).name if self.signum is not None else None

    def expired(self) -> bool:
        return self.received_at is not None and time.monotonic() - self.received_at > self.grace_s

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"{signal.Signals(signum).name} again")
        self.signum, self.received_at = signum, time.monotonic()
        print(f"atoll: {signal.Signals(signum).name} received: stopping after the current step with a "
              f"checkpoint (at most {self.grace_s:g} s; send it again to abort at once)",
              file=sys.stderr, flush=True)
        if self.on_expired is not None:
            timer = threading.Timer(self.grace_s, self.on_expired)
            timer.daemon = True
            timer.start()

    @contextlib.contextmanager
    def installed(self):
        """Handle the signals in this block (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def reclaim(self) -> None:
        """Handle the signals again after a library took them (`ray.init` makes SIGTERM exit)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)

    def watch(self, on_expired: Callable[[], None]) -> None:
        """Call `on_expired` on a timer thread once a stop's grace period has run out (for a run
        in this process: its main thread may be inside a step that never ends)."""
        self.on_expired = on_expired


def exit_now(code: int) -> None:
    """Leave the process at once (stdio flushed), without waiting for threads or collectives."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
