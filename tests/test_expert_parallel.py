"""Expert parallelism: same model, same numbers, checkpoints that cross ep degrees.

The single-process run is the reference. ep=2 runs (real torchrun, gloo
all-to-all) with FSDP and with DDP must follow its loss trajectory, and
checkpoints saved at ep=2 resume at ep=1 and vice versa, optimizer state
included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from atoll.checkpoint.manifest import verify
from atoll.checkpoint.store import resolve_checkpoint
from atoll.launch.cli import main
from atoll.trainer.config import MoEConfig
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.moe import MoE, Router, apply_capacity
from conftest import TINY_MOE, losses, run_cli

STEPS = 6


@pytest.mark.slow
def test_ep2_matches_ep1_and_checkpoints_cross_ep_degrees(tmp_path):
    common = [*TINY_MOE, f"run.steps={STEPS}", "checkpoint.interval=3"]
    reference = tmp_path / "reference"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"run.dir={reference}"]) == 0
    expected = losses(reference)

    # ep=2 with FSDP: the whole run, saving at step 3 with experts split over 2 ranks.
    ep_fsdp = tmp_path / "ep2_fsdp"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.ep=2", f"run.dir={ep_fsdp}"],
                   torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(ep_fsdp) == pytest.approx(expected, rel=1e-5)
    saved = ep_fsdp / "checkpoints" / "step-00000003"
    manifest = verify(saved)
    assert manifest["layout"]["ep"] == 2
    assert manifest["tensors"]["model.layers.0.feed_forward.experts.w1"]["shape"][0] == 4  # global E
    assert manifest["tensors"]["optim.state.layers.0.feed_forward.experts.w1.exp_avg"]["shape"][0] == 4

    # ep=2 -> ep=1: one process continues from the ep=2 checkpoint.
    to_ep1 = tmp_path / "to_ep1"
    assert main(["train", *common, "launch.backend=local", "parallel.dp=1", "data.grad_accum=2",
                 f"checkpoint.resume={saved}", f"run.dir={to_ep1}"]) == 0
    assert losses(to_ep1) == pytest.approx(expected[3:], rel=1e-5)

    # ep=1 -> ep=2 with DDP: the reference's own step-3 checkpoint, experts split on load.
    to_ep2 = tmp_path / "to_ep2_ddp"
    proc = run_cli(["train", *common, "parallel.dp=2", "parallel.ep=2", "parallel.dp_shard=ddp",
                    f"checkpoint.resume={resolve_checkpoint(reference / 'checkpoints' / 'step-00000003')}",
                    f"run.dir={to_ep2}"], torchrun_procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(to_ep2) == pytest.approx(expected[3:], rel=1e-5)
    # Load statistics reach the metrics, summed over both ranks' tokens.
    last = read_jsonl(to_ep2 / "metrics.jsonl")[-1]
    assert last["moe.0.mean_load"] == 2 * 2 * 32 * 2 / 4  # dp × micro_batch × seq_len × top_k / E
    assert last["moe.0.max_load"] >= last["moe.0.mean_load"] and last["moe.0.dropped"] == 0


def test_group_limited_routing_picks_equally_from_every_group():
    torch.manual_seed(0)
    router = Router(16, 8, 4, groups=2)
    _, experts_TK, _ = router(torch.randn(50, 16))
    per_group = (experts_TK // 4)  # experts 0-3 are group 0, 4-7 group 1
    assert torch.equal((per_group == 0).sum(-1), torch.full((50,), 2))
    assert torch.equal((per_group == 1).sum(-1), torch.full((50,), 2))


def test_aux_free_bias_steers_selection_not_gates():
    torch.manual_seed(0)
    router = Router(8, 4, 1, renormalize=False)
    x = torch.randn(200, 8)
    gates_before, experts_before, probs = router(x)
    load = torch.bincount(experts_before.flatten(), minlength=4)
    for _ in range(200):
        router.update_bias(torch.bincount(router(x)[1].flatten(), minlength=4), rate=1e-2)
    gates, experts, _ = router(x)
    balanced = torch.bincount(experts.flatten(), minlength=4)
    assert balanced.max() - balanced.min() < load.max() - load.min()
    # Gates are the unbiased probabilities of whichever experts were selected.
    torch.testing.assert_close(gates, probs.gather(1, experts))
    assert "expert_bias_E" in router.state_dict()


def test_sigmoid_scores_and_capacity_accounting():
    torch.manual_seed(0)
    moe = MoE(8, 12, MoEConfig(num_experts=4, top_k=2, score_func="sigmoid", capacity_factor=0.5,
                               balance="none"))
    x = torch.randn(2, 10, 8)
    out, _ = moe(x)
    gates, experts, probs = moe.router(x.reshape(-1, 8))
    torch.testing.assert_close(probs, torch.sigmoid(F.linear(x.reshape(-1, 8), moe.router.gate.weight)))
    kept = apply_capacity(experts, 4, 0.5)
    capacity = 5  # ceil(0.5 · 20 tokens · 2 slots / 4 experts)
    for e in range(4):
        assert (experts[kept] == e).sum() <= capacity
    load, dropped = moe.take_load()
    assert load.sum() + dropped == 20 * 2 and dropped == (~kept).sum() > 0
    # A dropped assignment contributes nothing: equal to the kernel with its gate zeroed.
    expected = moe.experts(x.reshape(-1, 8), gates * kept, experts).reshape(2, 10, 8)
    torch.testing.assert_close(out, expected)
