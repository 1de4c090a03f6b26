"""What a run reports to the person who started it: the summary line, the loss curve,
and console output that stays plain text when it is not a terminal.
"""

from __future__ import annotations

import subprocess
import sys

from atoll.launch.cli import main
from atoll.trainer.metrics import MetricsLogger, loss_series
from conftest import TINY_MOE, subprocess_env

LOCAL = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=3"]


def summary_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("done: ")]
    assert len(lines) == 1, out
    return lines[0]


def test_resumed_run_summarises_its_own_steps_and_plots_the_whole_run(tmp_path, capsys, monkeypatch):
    drawn = []
    draw = MetricsLogger._plot
    monkeypatch.setattr(MetricsLogger, "_plot",
                        lambda self, train, evals: (drawn.append(train), draw(self, train, evals)))
    args = ["train", *LOCAL, "run.steps=6", f"run.dir={tmp_path}"]

    assert main([*args, "run.stop_at=3"]) == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary.startswith("done: 3 steps in "), summary
    assert [step for step, _ in drawn[-1]] == [1, 2, 3]

    assert main(args) == 0
    summary = summary_line(capsys.readouterr().out)
    assert summary.startswith("done: steps 4-6 of 6 (resumed from step 3) in "), summary
    assert "(step 1) -> " in summary and "(step 6)" in summary
    assert [step for step, _ in drawn[-1]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_loss_series_orders_steps_and_keeps_the_newest_row():
    rows = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 4.0, "eval_loss": 4.5},
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": "nan"}, {"step": 4, "loss": 2.0}]
    assert loss_series(rows) == ([(1, 4.0), (2, 2.5), (4, 2.0)], [(1, 4.5)])


# A worker process that ends as a Ray actor does when its last handle goes: its child
# processes are killed first, then the interpreter exits and runs its atexit hooks.
EXIT_LIKE_A_RAY_WORKER = """
import sys, psutil
from atoll.launch.cli import main
code = main(sys.argv[1:])
for child in psutil.Process().children(recursive=True):
    child.kill()
psutil.wait_procs(psutil.Process().children(recursive=True), timeout=10)
sys.exit(code)
"""


def test_wandb_offline_run_ends_without_a_traceback(tmp_path):
    """wandb's service process is a child of the logging rank; the run ends it itself."""
    args = ["train", *LOCAL, "logging.wandb=offline", "checkpoint.interval=0", "run.steps=1",
            f"run.dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", EXIT_LIKE_A_RAY_WORKER, *args], capture_output=True,
                          text=True, timeout=120, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "\x1b" not in proc.stdout + proc.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
