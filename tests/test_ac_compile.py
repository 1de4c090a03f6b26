"""Activation checkpointing and torch.compile, applied from outside the model.

Activation checkpointing must change nothing but memory: the loss, every
gradient and the MoE routing statistics (loads, drops: what the aux-free bias
and the load metrics read) are bitwise those of the run without it, in fp32 on
CPU, alone and under FSDP with expert parallelism; and checkpoints cross
between the two. Compiled blocks follow the eager run's losses within 1e-5,
compile each graph once, and report their graph breaks once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atoll.launch.cli import main
from atoll.parallel.activation_checkpointing import apply_activation_checkpointing
from atoll.trainer.config import model_config, recipe_from_dict
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.model import Transformer
from conftest import TINY_MOE, assert_same_metrics, assert_same_state, moe_stats, run_cli

# Capacity drops assignments and aux-free balancing moves the bias from the loads: a
# double-counted recompute would show in both. Zero, copy and constant experts (MoE++) take
# some of the assignments: the kernels skip those, recomputed or compiled.
ROUTING = ["model.moe.capacity_factor=1.0", "model.moe.balance=aux_free", "model.moe.bias_update_rate=0.01",
           "model.moe.zero_experts=1", "model.moe.copy_experts=1", "model.moe.constant_experts=1"]


def _tiny_model(mode: str) -> Transformer:
    cfg = recipe_from_dict({"model": {
        "dim": 32, "layers": 3, "heads": 4, "vocab_size": 256, "activation_checkpointing": mode,
        "moe": {"num_experts": 4, "top_k": 2, "capacity_factor": 1.0, "balance": "aux_free",
                "zero_experts": 1, "copy_experts": 1, "constant_experts": 1, "gating_residual": True}}})
    model = Transformer(model_config(cfg))
    model.init_weights(0)
    apply_activation_checkpointing(model, cfg.model)
    return model


def test_checkpointing_recomputes_blocks_with_same_names_gradients_and_loads():
    tokens_BS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in ("none", "full", "selective"):
        model = _tiny_model(mode)
        calls = {name: 0 for name in model.layers}
        for name, block in model.layers.items():
            block.attention.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        logits_BSV, aux = model(tokens_BS)
        loss = F.cross_entropy(logits_BSV.flatten(0, 1), tokens_BS.flatten()) + aux
        loss.backward()
        moe = [block.feed_forward for block in model.layers.values()]
        results[mode] = (list(model.state_dict()), loss, {n: p.grad for n, p in model.named_parameters()},
                         [m.take_load() for m in moe], calls)

    names, loss, grads, loads, calls = results["none"]
    assert calls == {"0": 1, "1": 1, "2": 1}
    # full: every block runs again in backward; selective (ac_every=2): blocks 1, 3, ...
    assert results["full"][4] == {"0": 2, "1": 2, "2": 2}
    assert results["selective"][4] == {"0": 1, "1": 2, "2": 1}
    assert sum(int(dropped) for _, dropped in loads) > 0  # capacity really drops
    for mode in ("full", "selective"):
        got_names, got_loss, got_grads, got_loads, _ = results[mode]
        assert got_names == names and list(got_grads) == list(grads)  # no wrapper in the names
        assert torch.equal(got_loss, loss), mode
        for name in grads:
            assert torch.equal(got_grads[name], grads[name]), f"{mode}: {name}"
        for (got_load, got_dropped), (load, dropped) in zip(got_loads, loads):  # counted once
            assert torch.equal(got_load, load) and torch.equal(got_dropped, dropped), mode


def test_checkpointing_trains_bitwise_and_checkpoints_cross_it(tmp_path):
    """Four steps with AC full are those without, to the bit: loss, gradient
    norm, loads and drops per step, weights, Adam moments and the aux-free bias at the end;
    a checkpoint saved with AC on resumes with it off, and the other way round."""
    common = [*TINY_MOE, *ROUTING, "model.layers=3", "run.steps=4", "checkpoint.interval=2",
              "launch.backend=local", "parallel.dp=1"]
    runs = {}
    for mode in ("none", "full"):
        runs[mode] = tmp_path / mode
        assert main(["train", *common, f"model.activation_checkpointing={mode}", f"run.dir={runs[mode]}"]) == 0
    assert_same_metrics(runs["full"], runs["none"], names=("loss", "grad_norm", "aux_loss"), rel=0)
    assert moe_stats(runs["full"]) == moe_stats(runs["none"])
    assert_same_state(runs["full"], runs["none"])
    assert any(stats["moe.0.dropped"] for stats in moe_stats(runs["none"]))

    for mode, saved_by in (("none", "full"), ("full", "none")):
        resumed = tmp_path / f"{mode}_from_{saved_by}"
        assert main(["train", *common, f"model.activation_checkpointing={mode}",
                     f"checkpoint.resume={runs[saved_by] / 'checkpoints' / 'step-00000002'}",
                     f"run.dir={resumed}"]) == 0
        assert_same_metrics(resumed, runs["none"], names=("loss", "grad_norm"), rel=0, first_step=3)
        assert_same_state(resumed, runs["none"])


@pytest.mark.slow
def test_checkpointing_bitwise_under_fsdp_with_expert_parallel(tmp_path):
    """dp=2 FSDP with experts split over ep=2 (all-to-alls recomputed in backward): AC full
    gives the run without AC, to the bit, loads summed over both ranks included."""
    common = [*TINY_MOE, *ROUTING, "run.steps=3", "checkpoint.interval=3", "parallel.dp=2", "parallel.ep=2"]
    runs = {}
    for mode in ("none", "full"):
        runs[mode] = tmp_path / mode
        proc = run_cli(["train", *common, f"model.activation_checkpointing={mode}", f"run.dir={runs[mode]}"],
                       torchrun_procs=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(runs["full"], runs["none"], names=("loss", "grad_norm", "aux_loss"), rel=0)
    assert moe_stats(runs["full"]) == moe_stats(runs["none"])
    assert read_jsonl(runs["none"] / "metrics.jsonl")[0]["moe.0.mean_load"] > 0
    assert_same_state(runs["full"], runs["none"])


@pytest.mark.slow
def test_checkpointing_in_pipeline_stages_follows_one_process(tmp_path):
    """pp=2 with AC full (stage shape inference, 1F1B recompute): one process's losses, and
    its loads and drops exactly (each counted once by the stage that routed them)."""
    common = [*TINY_MOE, *ROUTING, "run.steps=3", "checkpoint.interval=0"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.micro_batch=1",
                 "data.grad_accum=2", f"run.dir={reference}"]) == 0
    pipeline = tmp_path / "pipeline"
    proc = run_cli(["train", *common, "parallel.pp=2", "parallel.dp=1", "parallel.microbatches=2",
                    "model.activation_checkpointing=full", f"run.dir={pipeline}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(pipeline, reference, names=("loss", "grad_norm", "aux_loss"), rel=1e-5)
    assert moe_stats(pipeline) == moe_stats(reference)


def _compiled_matches_eager(tmp_path, capsys, name: str, overrides: list[str]) -> str:
    """Five steps compiled within 1e-5 of eager (no graph recompiled); the compile report."""
    torch._dynamo.reset()  # no graphs from earlier tests
    common = [*TINY_MOE, *overrides, "run.steps=5", "checkpoint.interval=0", "launch.backend=local",
              "parallel.dp=1"]
    eager, compiled = tmp_path / f"{name}_eager", tmp_path / f"{name}_compiled"
    assert main(["train", *common, f"run.dir={eager}"]) == 0
    capsys.readouterr()
    with torch._dynamo.config.patch(error_on_recompile=True):  # the other blocks and steps reuse
        assert main(["train", *common, "model.compile=true", f"run.dir={compiled}"]) == 0
    assert_same_metrics(compiled, eager, names=("loss", "grad_norm"), rel=1e-5)
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("compile:")]
    assert len(reports) == 1, reports  # once, for the first block
    return reports[0]


def test_compiled_dense_blocks_match_eager_in_one_graph(tmp_path, capsys):
    report = _compiled_matches_eager(tmp_path, capsys, "dense", ["model.moe.num_experts=0"])
    assert "into 1 graph(s) with 0 graph break(s)" in report


def test_compiled_moe_blocks_with_checkpointing_match_eager(tmp_path, capsys):
    """MoE blocks, compiled inside activation checkpointing: the experts and the routing
    statistics run eagerly (the graph breaks the report names), counted once."""
    report = _compiled_matches_eager(tmp_path, capsys, "moe",
                                     [*ROUTING, "model.activation_checkpointing=full",
                                      "model.moe.gating_residual=true"])
    assert "GroupedExperts.forward" in report and "_record_routing" in report
    eager, compiled = tmp_path / "moe_eager", tmp_path / "moe_compiled"
    assert moe_stats(compiled) == moe_stats(eager)
