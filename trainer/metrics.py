"""What a run reports: metrics.jsonl, events.jsonl, progress, wandb, summary.

Only the logging rank creates a `MetricsLogger` with `enabled=True`; other
ranks get a silent one, so the train loop never asks which rank it is. The
run directory's files follow DESIGN §5: one JSON object per logged step in
metrics.jsonl and one per event (failure, restart, checkpoint_commit, ...)
in events.jsonl. wandb runs offline by default and keeps its run id in the
run directory so a resumed run continues the same wandb run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Optional

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so a crash loses at most that line."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=False) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def record_event(run_dir: Path, event: str, /, **fields: Any) -> None:
    append_jsonl(Path(run_dir) / EVENTS_FILE, {"event": event, "time": time.time(), **fields})


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, enabled: bool = True,
                 wandb_mode: str = "offline", recipe: Optional[dict] = None,
                 progress_bar: bool = True, name: str = "atoll", wandb_run_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.history: list[dict[str, Any]] = []
        self._bar = None
        self._wandb = None
        self.wandb_run_id: Optional[str] = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if progress_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=name, unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(wandb_mode, recipe or {}, name, wandb_run_id)

    def _start_wandb(self, mode: str, recipe: dict, name: str, saved_id: Optional[str]):
        import wandb

        # The run directory's id wins; else the one a resumed checkpoint carried; else new.
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = (id_file.read_text().strip() if id_file.exists() else None) or saved_id \
            or uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb_run_id = run_id
        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project="atoll", name=name, id=run_id, mode=mode, dir=str(self.run_dir),
                          config=recipe, resume="allow",
                          settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.history.append(record)
        append_jsonl(self.run_dir / METRICS_FILE, record)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
        self._show(step, record)

    def _show(self, step: int, record: dict[str, Any]) -> None:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(1, done) * (self.total_steps - step)
        parts = [f"loss {record['loss']:.4f}"] if "loss" in record else []
        if "eval_loss" in record:
            parts.append(f"eval {record['eval_loss']:.4f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if self._bar is not None:
            self._bar.set_postfix_str(" | ".join(parts), refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(f"step {step}/{self.total_steps} | " + " | ".join(parts)
                  + f" | eta {format_duration(eta)}", flush=True)

    def event(self, event: str, /, **fields: Any) -> None:
        if self.enabled:
            record_event(self.run_dir, event, **fields)

    def close(self, final_step: int, summary: bool = True) -> Optional[str]:
        """Finish wandb, draw the loss curve of the whole run and return the one-line summary."""
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            self._wandb = None
            # End wandb's service process now. Left to wandb's atexit hook, the teardown
            # would run after a Ray actor's exit has killed the actor's child processes,
            # the service among them, and print a ConnectionResetError traceback.
            wandb.teardown()
        if not summary:
            return None
        # metrics.jsonl holds every logged step of the run, earlier invocations included.
        train, evals = loss_series(read_jsonl(self.run_dir / METRICS_FILE))
        elapsed = time.perf_counter() - self.started
        if self.start_step:
            summary = (f"done: steps {self.start_step + 1}-{final_step} of {self.total_steps} "
                       f"(resumed from step {self.start_step}) in {format_duration(elapsed)}")
        else:
            summary = f"done: {final_step} steps in {format_duration(elapsed)}"
        if train:
            (first_step, first_loss), (last_step, last_loss) = train[0], train[-1]
            rates = [r["tokens_per_s"] for r in self.history if "tokens_per_s" in r]
            summary += (f" | loss {first_loss:.4f} (step {first_step}) -> {last_loss:.4f}"
                        f" (step {last_step})")
            if rates:  # this invocation's speed
                summary += f" | {sum(rates) / len(rates):,.0f} tok/s"
            self._plot(train, evals)
        if evals:
            summary += f" | eval loss {evals[-1][1]:.4f}"
        summary += f" | {self.run_dir}"
        print(summary, flush=True)
        return summary

    def _plot(self, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(*zip(*train), label="train")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss.png")
        plt.close(fig)


def loss_series(records: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The (step, loss) and (step, eval_loss) points of metrics.jsonl rows, by step.

    A step logged again (after a rollback) counts once, with its newest row. Values that
    were not finite are stored as strings and left out.
    """
    newest: dict[int, dict[str, Any]] = {}
    for record in records:
        if isinstance(record.get("step"), int):
            newest[record["step"]] = record
    rows = [newest[step] for step in sorted(newest)]
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    return train, evals


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
