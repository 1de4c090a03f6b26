"""Catching a diverging step before it touches the model.

Every step the loop hands the guard the global loss and gradient norm (the
same on every rank: they come from one all-reduce), before the optimizer
step and before anything is saved. A non-finite value, or a loss above
`fault_tolerance.spike_factor` × the median of the recent good losses, is
an anomaly: the step is skipped (no optimizer step, its batch is not
replayed). After `fault_tolerance.max_bad_steps` anomalies in a row the
loop rolls back to the last good snapshot. Every rank decides the same,
so no collective is needed to agree.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Optional

# The median needs some history before a spike means anything.
SPIKE_MIN_HISTORY = 10
SPIKE_WINDOW = 50


class AnomalyGuard:
    def __init__(self, spike_factor: float, max_bad_steps: int):
        self.spike_factor, self.max_bad_steps = spike_factor, max_bad_steps
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.bad_in_a_row = 0

    def classify(self, loss: float, grad_norm: float) -> Optional[tuple[str, float]]:
        """(kind, value) of an anomaly, or None for a good step."""
        if not math.isfinite(loss):
            return "nonfinite", loss
        if not math.isfinite(grad_norm):
            return "nonfinite", grad_norm
        if (self.spike_factor and len(self.recent) >= SPIKE_MIN_HISTORY
                and loss > self.spike_factor * statistics.median(self.recent)):
            return "spike", loss
        return None

    def check(self, loss: float, grad_norm: float) -> Optional[tuple[str, float, str]]:
        """None for a good step, else (kind, value, action) with action skip | rollback."""
        found = self.classify(loss, grad_norm)
        if found is None:
            self.bad_in_a_row = 0
            self.recent.append(loss)
            return None
        self.bad_in_a_row += 1
        action = "rollback" if self.bad_in_a_row >= self.max_bad_steps else "skip"
        if action == "rollback":
            self.bad_in_a_row = 0
        return found[0], found[1], action

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict) -> None:
        self.recent = deque(state.get("recent", []), maxlen=SPIKE_WINDOW)
        self.bad_in_a_row = 0
