"""End-to-end training: numerics across layouts and the real launchers.

The single-process run is the reference: 2-process FSDP and DDP runs (real
torchrun, gloo) must reproduce its loss trajectory, and the default recipe
must run through a real local Ray cluster.
"""

from __future__ import annotations

import json

import psutil
import pytest
import torch

from atoll.trainer.config import load_recipe, to_dict
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.optim import lr_multiplier
from atoll.trainer.loss import lm_loss
from atoll.trainer.train import Trainer, train
from conftest import (MARKER, SESSION_ID, TINY_MOE, assert_same_metrics, ended, finish, last_step, losses, run_cli,
                      start_ray_run, subprocess_env, wait_for)

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def listening_addresses() -> set[tuple[str, str, str]]:
    """(process name, address, command) of every listening socket of this session's processes."""
    found = set()
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.environ().get(MARKER) != SESSION_ID:
                continue
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((proc.info["name"], conn.laddr.ip, " ".join(proc.cmdline()[:4])[:120]))
        except (psutil.Error, OSError):
            continue
    return found


STEPS = 10


def reference_run(tmp_path, extra=()):
    """Single process, grad_accum=2: the same global batch as dp=2 × grad_accum=1."""
    cfg = load_recipe(None, [*TINY_MOE, f"run.steps={STEPS}", "launch.backend=local",
                             "parallel.dp=1", "data.grad_accum=2", f"run.dir={tmp_path / 'ref'}",
                             *extra])
    train(to_dict(cfg))
    return losses(tmp_path / "ref")


def test_single_process_matches_naive_loop(tmp_path):
    """The trainer's step equals a hand-written loop on the same model and batches."""
    cfg = load_recipe(None, [*TINY_MOE, "run.steps=3", "launch.backend=local", "parallel.dp=1",
                             "data.grad_accum=2", "optim.grad_clip=0", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    model = type(trainer.model)(trainer.model.cfg)
    model.load_state_dict(trainer.model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95), weight_decay=0.0)
    expected = []
    loader_state = trainer.loader.state_dict()
    for step in range(3):
        batches = trainer.loader.next_step()
        lr = cfg.optim.lr * lr_multiplier(step, cfg.optim.warmup_steps, cfg.run.steps,
                                          cfg.optim.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for inputs, targets in batches:
            logits, aux = model(inputs)
            loss = lm_loss(logits, targets)
            ((loss + aux) / len(batches)).backward()
            total += loss.detach().item()
        with torch.no_grad():  # decoupled weight decay on matrices only, as the trainer does
            for p in model.parameters():
                if p.ndim >= 2:
                    p.mul_(1 - lr * cfg.optim.weight_decay)
        opt.step()
        opt.zero_grad()
        expected.append(total / len(batches))
    trainer.loader.load_state_dict(loader_state)
    got = [trainer.train_step().loss for _ in range(3)]
    trainer.close()
    assert got == pytest.approx(expected, rel=1e-6)
    for (name, a), b in zip(trainer.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory):
    """The run folder of `reference_run`, shared by both data-parallel modes."""
    folder = tmp_path_factory.mktemp("single_process")
    reference_run(folder)
    return folder / "ref"


@pytest.mark.slow
@pytest.mark.parametrize("dp_shard", ["fsdp", "ddp"])
def test_two_process_data_parallel_matches_single_process(tmp_path, dp_shard, single_process_reference):
    expected = losses(single_process_reference)
    run_dir = tmp_path / dp_shard
    proc = run_cli(["train", *TINY_MOE, f"run.steps={STEPS}", "parallel.dp=2",
                    f"parallel.dp_shard={dp_shard}", f"run.dir={run_dir}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(run_dir)) == STEPS
    assert_same_metrics(run_dir, single_process_reference)  # loss and gradient norm at every step
    assert expected[-1] < expected[0]


@pytest.mark.slow
def test_default_recipe_on_ray(short_tmp):
    """The default recipe on the Ray cluster atoll starts itself trains, logs, evaluates and
    reports; while it trains, every listening socket of every process of the run (Ray's
    servers, the rendezvous store, gloo, the checkpoint writer, wandb) is on loopback."""
    run_dir = short_tmp / "run"
    proc = start_ray_run(["run.steps=16", "logging.log_interval=2", "logging.eval_interval=8",
                          f"run.dir={run_dir}", "launch.threads_per_worker=1"], short_tmp)
    with ended(proc):
        wait_for(lambda: last_step(run_dir) >= 2, 180, proc, "training")
        found = listening_addresses()
        out, err = finish(proc, 180)
    assert proc.returncode == 0, err[-3000:] + out[-3000:]
    names = {name for name, _, _ in found}
    assert {"gcs_server", "raylet"} <= names and len(found) > 5, found
    assert {addr for _, addr, _ in found} <= LOOPBACK, sorted(found)
    out += err
    assert "(rank0" in out and "step 16/16" in out and "done: 16 steps" in out
    assert "\x1b" not in out  # no colour codes in captured output
    assert "Traceback" not in err, err[-3000:]  # e.g. from wandb's exit in a worker
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(2, 17, 2))
    for key in ("loss", "lr", "tokens", "tokens_per_s", "step_time_s", "tflops", "comm_bytes"):
        assert key in records[-1], key
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records if "eval_loss" in r] == [8, 16]
    assert records[-1]["tokens"] == 16 * 2 * 8 * 128  # steps × dp × micro_batch × seq_len
    assert (run_dir / "loss.png").stat().st_size > 0
    assert "parallel:" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "wandb_run_id").read_text().strip()


@pytest.mark.slow
def test_worker_error_ends_ray_run_with_one_line(short_tmp):
    """Bad data found inside a worker (a folder with nothing to read: the driver only checks
    that it exists) reaches the user as one line, exit 2."""
    env = subprocess_env(RAY_TMPDIR=str(short_tmp))
    (short_tmp / "hollow").mkdir()
    (short_tmp / "hollow" / "empty.txt").write_bytes(b"")
    proc = run_cli(["train", *TINY_MOE, "run.steps=2", "data.source=folder",
                    f"data.path={short_tmp / 'hollow'}", f"run.dir={short_tmp / 'run'}"], env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"atoll: error: data.path {short_tmp / 'hollow'} has no readable text files"


def test_existing_run_dir_needs_overwrite(tmp_path, capsys):
    from atoll.launch.cli import main

    args = ["train", *TINY_MOE, "run.steps=1", "launch.backend=local", "parallel.dp=1",
            "checkpoint.interval=0", f"run.dir={tmp_path}"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert "already holds a run with no checkpoint to resume; pass run.overwrite=true" in \
        capsys.readouterr().err
    assert main(args + ["run.overwrite=true"]) == 0
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_a_second_run_in_one_process_does_not_reuse_a_port_taken_since(tmp_path, monkeypatch):
    """A one-rank run in a process that ran one before (a notebook, a test session) picks a
    free port for its store again: the first run's port was free then, and anything (an
    outgoing connection's ephemeral port) may hold it now."""
    import os
    import socket

    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    recipe = [*TINY_MOE, "launch.backend=local", "parallel.dp=1", "checkpoint.interval=0",
              "checkpoint.memory_interval=0"]
    Trainer(load_recipe(None, [*recipe, f"run.dir={tmp_path / 'first'}"])).close()
    first_port = int(os.environ["MASTER_PORT"])
    Trainer(load_recipe(None, [*recipe, f"run.dir={tmp_path / 'between'}"])).close()
    os.environ["MASTER_PORT"] = str(first_port)  # as code that saved and restored the environment leaves it
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first_port))
        taken.listen()
        trainer = Trainer(load_recipe(None, [*recipe, f"run.dir={tmp_path / 'second'}"]))
        trainer.close()
    assert int(os.environ["MASTER_PORT"]) != first_port
