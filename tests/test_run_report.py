"""What a run reports to the person who started it: the summary line, the loss curve,
and console output that stays plain text when it is not a terminal.
"""

from __future__ import annotations

import pytest

from atoll.launch.cli import main
from atoll.trainer.metrics import MetricsLogger, loss_series
from conftest import TINY_MOE

LOCAL = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=3"]


def test_resumed_run_summarises_its_own_steps_and_plots_the_whole_run(tmp_path, capsys, monkeypatch):
    drawn = []
    draw = MetricsLogger._plot
    monkeypatch.setattr(MetricsLogger, "_plot",
                        lambda self, train, evals: (drawn.append(train), draw(self, train, evals)))
    args = ["train", *LOCAL, "run.steps=6", f"run.dir={tmp_path}"]

    assert main([*args, "run.stop_at=3"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: 3 steps in "), summary
    assert [step for step, _ in drawn[-1]] == [1, 2, 3]

    assert main(args) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: steps 4-6 of 6 (resumed from step 3) in "), summary
    assert "(step 1) -> " in summary and "(step 6)" in summary
    assert [step for step, _ in drawn[-1]] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_loss_series_orders_steps_and_keeps_the_newest_row():
    rows = [{"step": 2, "loss": 3.0}, {"step": 1, "loss": 4.0, "eval_loss": 4.5},
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": "nan"}, {"step": 4, "loss": 2.0}]
    assert loss_series(rows) == ([(1, 4.0), (2, 2.5), (4, 2.0)], [(1, 4.5)])
