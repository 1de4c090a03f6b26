"""Resume from checkpoints: bitwise on the same layout, exact samples on any layout.

Real processes throughout: torchrun and Ray workers save asynchronously
(atoll's checkpoint writer process), later runs load under the same or another layout.
"""

from __future__ import annotations

import os

import pytest
import torch

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.launch.cli import main
from atoll.trainer.metrics import read_jsonl
from conftest import (TINY_MOE, assert_close_state, assert_same_metrics, final_state, grad_norms, losses,
                      mixture_recipe, run_cli, subprocess_env)

QUIET = ["logging.wandb=disabled", "logging.eval_interval=0", "logging.log_interval=1",
         "launch.threads_per_worker=1"]


@pytest.mark.slow
def test_resume_is_bitwise_exact_on_two_workers(short_tmp):
    """4 steps (Ray, async save) + resume + 4 steps (torchrun) == 8 uninterrupted steps."""
    default_moe = ["run.steps=8", "checkpoint.interval=4", "checkpoint.async=true",
                   "data.seq_len=64", "data.micro_batch=4", *QUIET]
    whole, split = short_tmp / "whole", short_tmp / "split"
    proc = run_cli(["train", *default_moe, f"run.dir={whole}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run_cli(["train", *default_moe, "run.stop_at=4", f"run.dir={split}"],
                   env=subprocess_env(RAY_TMPDIR=str(short_tmp)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3, 4]
    proc = run_cli(["train", *default_moe, f"run.dir={split}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step-00000004" in proc.stdout

    assert losses(split) == losses(whole)  # exactly, not approximately
    assert grad_norms(split) == grad_norms(whole)
    assert len(losses(whole)) == 8
    got, want = final_state(split), final_state(whole)
    assert got.keys() == want.keys()
    assert any(k.endswith(".exp_avg_sq") for k in want)  # optimizer moments compared too
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.slow
def test_resume_under_other_layouts_continues_the_same_run(tmp_path):
    """Saved by 2-process FSDP; resumed by 1 process, by 2-process DDP and by a 2-stage
    pipeline: the same losses, gradient norms, samples per source and eval losses per source
    as the uninterrupted run, and at the end every tensor (weights, the aux-free expert bias,
    both Adam moments, the step) within 1e-5 of its own. The data is a three-source mixture
    of real corpus files (jsonl, parquet, save_to_disk) tokenised with a local tokenizer; the
    layers have zero, copy and constant experts (MoE++), whose parameters reshard too.
    aux_free balance: a pipeline microbatch (half a micro-batch) has a switch loss of its own."""
    common = [str(mixture_recipe(tmp_path)), *TINY_MOE, "run.steps=10", "checkpoint.interval=5",
              "logging.eval_interval=5", "model.moe.balance=aux_free",
              "model.moe.zero_experts=1", "model.moe.copy_experts=1", "model.moe.constant_experts=1"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"run.dir={reference}"]) == 0
    expected = losses(reference)

    saved = tmp_path / "fsdp2"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.dp_shard=fsdp", "run.stop_at=5",
                    f"run.dir={saved}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("tokenised web") == 1  # by one rank; the other waited and mapped it
    ckpt = resolve_checkpoint(saved)
    assert verify(ckpt)["layout"]["dp"] == 2 and verify(ckpt)["samples"] == 5 * 4

    one = tmp_path / "dp1"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"checkpoint.resume={ckpt}", f"run.dir={one}"]) == 0
    ddp = tmp_path / "ddp2"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.dp_shard=ddp",
                    f"checkpoint.resume={ckpt}", f"run.dir={ddp}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipeline = tmp_path / "pp2"
    proc = run_cli(["train", *common, "parallel.pp=2", "data.grad_accum=2", f"checkpoint.resume={ckpt}",
                    f"run.dir={pipeline}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert [r["step"] for r in read_jsonl(one / "metrics.jsonl")] == [6, 7, 8, 9, 10]
    assert losses(saved) == pytest.approx(expected[:5], rel=1e-5)
    assert grad_norms(saved) == pytest.approx(grad_norms(reference)[:5], rel=1e-5)
    want = read_jsonl(reference / "metrics.jsonl")
    per_source = ("samples.web", "samples.code", "samples.math")
    evals = ("eval_loss", "eval_loss.web", "eval_loss.code", "eval_loss.math")
    for run in (one, ddp, pipeline):
        assert_same_metrics(run, reference, first_step=6)
        got = read_jsonl(run / "metrics.jsonl")
        assert [[r[k] for k in per_source] for r in got] == [[r[k] for k in per_source] for r in want[5:]]
        assert [got[-1][k] for k in evals] == pytest.approx([want[-1][k] for k in evals], rel=1e-5)
        # The routers and constant experts sum their gradients over tokens in another order
        # under FSDP; Adam's steps carry that to ~7e-6 of a tensor's scale by step 10.
        state = assert_close_state(run, reference, tol=1e-5)
    assert all(state[f"model.layers.{i}.feed_forward.router.expert_bias_E"].any() for i in (0, 1))
    assert "model.layers.1.feed_forward.zero_compute.constant_gate" in state
    # Same samples: every resumed run ends at the same data position as the reference, and
    # the sources hold their shares of the 40 samples to within one.
    last, shares = want[-1], {"web": 0.5, "code": 0.3, "math": 0.2}
    assert sum(last[f"samples.{n}"] for n in shares) == last["samples"] == 40
    assert all(abs(last[f"samples.{n}"] - 40 * w) <= 1 for n, w in shares.items())
    assert last["eval_loss"] == pytest.approx(sum(w * last[f"eval_loss.{n}"] for n, w in shares.items()))
    for run in (one, ddp, pipeline):
        assert read_jsonl(run / "metrics.jsonl")[-1]["samples"] == 40


@pytest.mark.slow
def test_checkpoints_cross_between_what_dp_shard_auto_chose_and_fsdp(tmp_path):
    """auto (DDP for this small model) saves at step 3; FSDP resumes it to step 6 and saves;
    auto resumes that to step 8: every resumed step has the loss and gradient norm of the
    uninterrupted auto run, and each checkpoint names the mode that wrote it."""
    common = [*TINY_MOE, "run.steps=8", "checkpoint.interval=3", "checkpoint.keep=3", "parallel.dp=2"]
    auto = [*common, "parallel.dp_shard=auto"]  # after TINY_MOE's fsdp: the last one holds
    whole = tmp_path / "auto"
    proc = run_cli(["train", *auto, f"run.dir={whole}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dp=2, ep=1), dp_shard=ddp (auto: replicated state" in proc.stdout
    saved_by_auto = whole / "checkpoints" / "step-00000003"
    assert verify(saved_by_auto)["layout"]["dp_shard"] == "ddp"

    fsdp = tmp_path / "fsdp"
    proc = run_cli(["train", *common, "parallel.dp_shard=fsdp", "run.stop_at=6",
                    f"checkpoint.resume={saved_by_auto}", f"run.dir={fsdp}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved_by_fsdp = fsdp / "checkpoints" / "step-00000006"
    assert verify(saved_by_fsdp)["layout"]["dp_shard"] == "fsdp"
    back = tmp_path / "auto_again"
    proc = run_cli(["train", *auto, f"checkpoint.resume={saved_by_fsdp}", f"run.dir={back}"],
                   torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]

    reference = read_jsonl(whole / "metrics.jsonl")
    for run, steps in ((fsdp, [4, 5, 6]), (back, [7, 8])):
        rows = read_jsonl(run / "metrics.jsonl")
        want = [r for r in reference if r["step"] in steps]
        assert [r["step"] for r in rows] == steps
        assert [r["samples"] for r in rows] == [r["samples"] for r in want]
        for name in ("loss", "grad_norm"):
            assert [r[name] for r in rows] == pytest.approx([r[name] for r in want], rel=1e-5), (run, name)


def test_rerun_with_nothing_to_do_leaves_config_yaml_untouched(tmp_path, capsys):
    """A rerun of a finished run says `nothing to do` and leaves the recipe it ran with as it
    was, even when the rerun's recipe differs (bytes and mtime)."""
    common = [*TINY_MOE, "run.steps=1", "checkpoint.interval=1", "launch.backend=local",
              "parallel.dp=1", f"run.dir={tmp_path}"]
    assert main(["train", *common]) == 0
    config = tmp_path / "config.yaml"
    written = config.read_bytes()
    os.utime(config, ns=(1_000_000_000, 1_000_000_000))  # any rewrite would move it
    capsys.readouterr()
    assert main(["train", *common, "logging.log_interval=7"]) == 0
    assert "nothing to do: run default is already at step 1" in capsys.readouterr().out
    assert config.read_bytes() == written
    assert config.stat().st_mtime_ns == 1_000_000_000
