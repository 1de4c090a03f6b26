"""The Ray actor that runs one rank: `TrainWorker`.

It trains on a thread of its own, so that it keeps answering the driver
(launch/worker_group.py) while it trains: `status()` returns its state and
its last heartbeat, `request_stop()` asks the train loop to stop at the next
step boundary. A process whose run ended (finished, or failed because a peer
died) can start the next group's run: a survivor serves several groups.

A warm spare (rank -1, launch/worker_group.py `ActorPool`) imports torch and
atoll as soon as it is created, while the group it may later replace trains
beside it; the straggler policy does not score a group's steps while that
import runs (launch/supervisor.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import traceback
from typing import Any, Optional

# A survivor of a failed group may still be leaving its last run (its next collective fails
# with the dead peer, then it closes): a new start waits this long for that, else fails.
PREVIOUS_RUN_END_S = 20.0


class TrainWorker:
    """One rank of the run (wrapped with ray.remote when the group starts)."""

    def __init__(self, rank: int = -1):
        self.rank = rank  # -1 for a spare that no group has taken yet
        self.state = "idle"
        self.beat: dict = {}
        self.error: Optional[dict] = None
        self.result: Optional[dict] = None
        self.stop: Any = False
        self.thread: Optional[threading.Thread] = None
        self.runs = 0  # how many runs this process started (a survivor serves several groups)

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"rank{self.rank}" if self.rank >= 0 else "worker"

    def info(self, rank: int) -> dict:
        self.rank = rank
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as sock:  # a free port for the rendezvous store, on Ray's address
            sock.bind((ip, 0))
            port = sock.getsockname()[1]
        return {"ip": ip, "port": port, "node": ray.get_runtime_context().get_node_id(),
                "pid": os.getpid(), "gpus": [str(gpu) for gpu in ray.get_gpu_ids()],
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def warm_up(self) -> bool:
        """Import what training needs now (a spare: before a group needs it)."""
        import atoll.trainer.train  # noqa: F401  (torch, the model, DCP)

        return True

    def start(self, env: dict[str, str], recipe: dict, store: Any = None, attempt: int = 0,
              rejoin_token: Optional[str] = None) -> None:
        # A survivor of a failed group may still be closing its last run: the new run's thread
        # waits for it, so that this actor keeps answering (status).
        previous = self.thread
        self.runs += 1
        # Nothing of a survivor's last run stays: error, result, stop request.
        self.error, self.result, self.stop = None, None, False
        self.state, self.beat = "running", {"time": time.time()}
        self.thread = threading.Thread(target=self._train,
                                       args=(self.runs, previous, env, recipe, store, attempt, rejoin_token),
                                       daemon=True, name=f"atoll-train-rank{self.rank}")
        self.thread.start()

    def _train(self, run: int, previous: Optional[threading.Thread], env: dict[str, str], recipe: dict,
               store: Any, attempt: int, rejoin_token: Optional[str]) -> None:
        from atoll.launch.cli import user_errors
        from atoll.parallel.outer_group import StateDiverged
        from atoll.trainer.hooks import RunControl
        from atoll.trainer.train import TrainingError, train

        def report(**fields) -> None:  # a run that a newer one replaced reports nothing
            if self.runs == run:
                for name, value in fields.items():
                    setattr(self, name, value)

        if previous is not None:
            previous.join(PREVIOUS_RUN_END_S)
            if previous.is_alive():
                report(error={"type": "RuntimeError", "user": False, "traceback": "",
                              "message": f"its previous run did not end within {PREVIOUS_RUN_END_S:g}s"},
                       state="failed")
                return
        os.environ.update(env)
        control = RunControl(snapshot_store=store, attempt=attempt, heartbeat=lambda info: report(beat=dict(info)),
                             stop_request=lambda: self.stop, rejoin_token=rejoin_token)
        try:
            result = train(recipe, control)
            report(result=result, state="finished")
        except BaseException as exc:  # reported to the driver, which decides
            report(error={"type": type(exc).__name__, "message": " ".join(str(exc).split())[:2000],
                          "user": isinstance(exc, user_errors() + (TrainingError, StateDiverged)),
                          "traceback": traceback.format_exc()[-4000:]},
                   state="failed")

    def status(self) -> dict:
        return {"state": self.state, "beat": self.beat, "error": self.error, "result": self.result}

    def request_stop(self, reason: str) -> None:
        self.stop = reason  # what RunControl.stop_request returns: RESIZE or a signal's name
