"""Experts that cost nothing: zero, copy and constant experts (MoE++), null experts (AdaMoE).

Every kernel against a per-token reference written from the papers' formulas
(forward and backward), the AdaMoE renormalisation, the heterogeneous balance
loss, the router z-loss and the gating residual against hand-computed values,
tau and the auxiliary-loss-free bias steering the share of zero-computation
assignments, the warmup-stable-decay schedule, the FLOPs a step counts, and
the one-line errors of combinations that cannot work.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atoll.checkpoint.hf import CheckpointError, architecture_for
from atoll.launch.cli import main
from atoll.parallel.kernels import grouped_mm_usable, triton_usable
from atoll.trainer.config import MoEConfig
from atoll.trainer.metrics import read_jsonl
from atoll.trainer.moe import ExpertKinds, MoE, load_balancing_loss, router_z_loss, routing_summary
from atoll.trainer.optim import lr_multiplier
from conftest import TINY_MOE, final_state, losses

CPU = torch.device("cpu")
KERNELS = ["naive", "sorted"] + (["grouped_mm"] if grouped_mm_usable(CPU, torch.float32) else []) + \
    (["triton"] if triton_usable(CPU) else [])  # the interpreter: tests/conftest.py turns it on
D, H = 8, 12
MOE_PP = dict(num_experts=4, zero_experts=1, copy_experts=1, constant_experts=2, top_k=2)


def moe_layer(kernel="naive", **keys) -> MoE:
    torch.manual_seed(0)
    cfg = {**MOE_PP, "balance": "none", "renormalize": False, **keys}
    moe = MoE(D, H, MoEConfig(kernel=kernel, **cfg))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.4)
    return moe


def reference_output(moe: MoE, x_TD: torch.Tensor, gates_TK, experts_TK) -> torch.Tensor:
    """out[t] = sum_k g[t, k] E_k(x[t]), one token and one slot at a time, from the formulas."""
    kinds, experts = moe.kinds, moe.experts
    rows = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        out = torch.zeros_like(x)
        for k in range(experts_TK.shape[1]):
            e, g = int(experts_TK[t, k]), gates_TK[t, k]
            if e < kinds.ffn:
                out = out + g * ((F.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e])
            elif e in kinds.ids("zero"):
                pass  # E(x) = 0
            elif e in kinds.ids("copy"):
                out = out + g * x
            else:
                c = e - kinds.ids("constant").start
                a1, a2 = (moe.zero_compute.constant_gate[c] @ x).softmax(-1)
                out = out + g * (a1 * x + a2 * moe.zero_compute.constant_vector[c])
        rows.append(out)
    return torch.stack(rows)


def routed_tokens(moe: MoE, T=24, seed=1):
    """Tokens, and a selection bias that makes the first tokens pick only zero-computation
    experts and leaves FFN expert 3 without a token."""
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(seed))
    moe.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, -9.0, 0.0, 0.0, 0.0, 0.0]))
    return x


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_equals_the_per_token_reference(kernel):
    moe = moe_layer(kernel)
    x = routed_tokens(moe).requires_grad_(True)
    out, _, _ = moe(x)
    gates_TK, experts_TK, _, _ = moe.router(x.detach()[0])
    # Not vacuous: every kind is picked, some token only zero-computation experts, expert 3 none.
    picked = set(experts_TK.flatten().tolist())
    assert {0, 4, 5, 6, 7} <= picked and 3 not in picked
    assert (experts_TK >= moe.num_experts).all(dim=1).any()

    x_ref = x.detach().clone().requires_grad_(True)
    reference = moe_layer("naive")
    reference.router.expert_bias_E.copy_(moe.router.expert_bias_E)
    gates_ref, experts_ref, _, _ = reference.router(x_ref[0])
    want = reference_output(reference, x_ref[0], gates_ref, experts_ref)
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-6)

    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    (want * weights[0]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(moe.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not moe.experts.w1.grad[3].any()  # the expert without a token


def test_adamoe_renormalises_over_the_true_experts_and_null_only_tokens_get_nothing():
    moe = moe_layer(num_experts=4, zero_experts=4, copy_experts=0, constant_experts=0, top_k=3,
                    renormalize=True, renormalize_over="nonzero")
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(3))
    moe.router.expert_bias_E.copy_(torch.tensor([0.0] * 4 + [0.05] * 4))
    gates_TK, experts_TK, probs_TE, _ = moe.router(x)
    true_TK = experts_TK < 4
    per_token = true_TK.sum(1)
    assert set(per_token.tolist()) >= {0, 1, 2}  # a variable number of true experts per token
    sums = (gates_TK * true_TK).sum(1)
    torch.testing.assert_close(sums[per_token > 0], torch.ones(int((per_token > 0).sum())))
    assert not gates_TK[~true_TK].any()
    want = probs_TE.gather(1, experts_TK) * true_TK
    want = want / want.sum(1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(gates_TK, want)
    out, _, _ = moe(x.view(1, 40, D))
    assert not out[0, per_token == 0].any()
    # MoE++ (renormalize_over=selected): the zero experts' share of the gates is output lost.
    moe_pp = moe_layer(num_experts=4, zero_experts=4, copy_experts=0, constant_experts=0, top_k=3,
                       renormalize=True)
    moe_pp.router.expert_bias_E.copy_(moe.router.expert_bias_E)
    gates_pp, experts_pp, probs_pp, _ = moe_pp.router(x)
    torch.testing.assert_close(gates_pp.sum(1), torch.ones(40))
    want = probs_pp.gather(1, experts_pp)
    torch.testing.assert_close(gates_pp, want / want.sum(1, keepdim=True))


def test_heterogeneous_balance_loss_and_z_loss_by_hand():
    probs = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2]])
    experts = torch.tensor([[0, 2], [1, 3]])
    weight = torch.tensor([1.0, 1.0, 0.25, 0.25])  # two FFN experts, two zero-computation at tau
    f = torch.tensor([1, 1, 1, 1]) / 4
    P = probs.mean(0)
    assert load_balancing_loss(probs, experts, weight).item() == pytest.approx(4 * float((weight * f * P).sum()))
    assert load_balancing_loss(probs, experts).item() == pytest.approx(4 * float((f * P).sum()))
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    z = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3)]
    assert router_z_loss(logits).item() == pytest.approx((z[0] ** 2 + z[1] ** 2) / 2)
    # The layer adds both, each with its coefficient.
    moe = moe_layer(balance="aux_loss", aux_loss_coef=0.1, z_loss_coef=0.01, zero_compute_tau=0.5)
    x = torch.randn(1, 16, D, generator=torch.Generator().manual_seed(4))
    _, aux, _ = moe(x)
    _, experts_TK, probs_TE, logits_TE = moe.router(x[0])
    w = torch.tensor([1.0] * 4 + [0.5] * 4)
    want = 0.1 * load_balancing_loss(probs_TE, experts_TK, w) + 0.01 * router_z_loss(logits_TE)
    torch.testing.assert_close(aux, want)


def test_gating_residual_adds_the_previous_layers_logits():
    from atoll.trainer.config import ModelConfig
    from atoll.trainer.model import Transformer

    cfg = ModelConfig(dim=D, layers=3, heads=2, vocab_size=32,
                      moe=MoEConfig(**MOE_PP, gating_residual=True))
    model = Transformer(cfg)
    model.init_weights(seed=0)
    seen = []
    for layer in model.layers.values():
        layer.feed_forward.router.register_forward_hook(lambda m, args, out: seen.append((args, out[3])))
    model(torch.randint(0, 32, (2, 5)))
    assert not seen[0][0][1].any()  # the first layer adds zeros
    for j in (1, 2):
        (x_TD, previous), logits = seen[j]
        router = model.layers[str(j)].feed_forward.router
        torch.testing.assert_close(previous, seen[j - 1][1])
        torch.testing.assert_close(logits, x_TD @ router.gate.weight.T + previous @ router.residual.weight.T)


def _train_router(moe: MoE, steps: int, lr: float = 0.5) -> float:
    """Train only the router against the balance loss; the share of zero-computation
    assignments at the end."""
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(5))
    optimizer = torch.optim.SGD(moe.router.parameters(), lr=lr)
    for _ in range(steps):
        _, experts_TK, probs_TE, _ = moe.router(x)
        loss = load_balancing_loss(probs_TE, experts_TK, moe._balance_weights(probs_TE))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _, experts_TK, _, _ = moe.router(x)
    return float((experts_TK >= moe.num_experts).float().mean())


def test_tau_steers_the_share_of_zero_computation_experts():
    """Lower tau weighs zero-computation experts less in the balance loss: they take more."""
    shares = {tau: _train_router(moe_layer(balance="aux_loss", zero_compute_tau=tau), steps=60)
              for tau in (0.2, 1.0, 3.0)}
    assert shares[0.2] > shares[1.0] + 0.05 > shares[3.0] + 0.1, shares


def test_aux_free_bias_reaches_the_target_share_tau_sets():
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(6))
    shares = {}
    for tau in (0.5, 2.0):
        moe = moe_layer(balance="aux_free", zero_compute_tau=tau)
        target = moe.target_share()
        # FFN experts weigh 1, the 4 others tau: the others' target share is 4/tau of 4 + 4/tau.
        assert float(target[4:].sum()) == pytest.approx((4 / tau) / (4 + 4 / tau))
        for _ in range(300):
            _, experts_TK, _, _ = moe.router(x)
            load_E = torch.bincount(experts_TK.flatten(), minlength=8)
            moe.router.update_bias(load_E, 0.01, target)
        _, experts_TK, _, _ = moe.router(x)
        shares[tau] = float((experts_TK >= 4).float().mean())
        assert shares[tau] == pytest.approx(float(target[4:].sum()), abs=0.05)
    assert shares[0.5] > shares[2.0] + 0.3


def test_routing_summary_counts_kinds_and_ffn_experts_per_token():
    kinds = ExpertKinds(ffn=4, zero=1, copy=1, constant=2)
    load = torch.tensor([10, 6, 4, 0, 8, 2, 5, 5], dtype=torch.float64)  # 40 assignments, top-2: 20 tokens
    summary = routing_summary(kinds, 2, load, torch.tensor(0.0))
    assert summary["share.ffn"] == pytest.approx(0.5) and summary["share.zero"] == pytest.approx(0.2)
    assert summary["share.copy"] == pytest.approx(0.05) and summary["share.constant"] == pytest.approx(0.25)
    assert summary["ffn_experts_per_token"] == pytest.approx(1.0)
    assert summary["max_load"] == 10 and summary["mean_load"] == 5


def test_wsd_and_constant_schedules_by_hand():
    args = dict(warmup_steps=10, total_steps=100, min_ratio=0.1)
    assert lr_multiplier(4, schedule="wsd", decay_fraction=0.2, **args) == pytest.approx(0.5)
    assert lr_multiplier(10, schedule="wsd", decay_fraction=0.2, **args) == 1.0
    assert lr_multiplier(79, schedule="wsd", decay_fraction=0.2, **args) == 1.0
    assert lr_multiplier(80, schedule="wsd", decay_fraction=0.2, **args) == 1.0  # the decay starts
    assert lr_multiplier(90, schedule="wsd", decay_fraction=0.2, **args) == pytest.approx(1 - 0.9 * 0.5)
    assert lr_multiplier(100, schedule="wsd", decay_fraction=0.2, **args) == pytest.approx(0.1)
    assert lr_multiplier(150, schedule="wsd", decay_fraction=0.2, **args) == pytest.approx(0.1)
    assert lr_multiplier(99, schedule="constant", **args) == 1.0
    assert lr_multiplier(55, **args) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_hf_export_stops_in_one_line_naming_the_key():
    for key, value in (("zero_experts", 1), ("copy_experts", 2), ("constant_experts", 1), ("gating_residual", True)):
        with pytest.raises(CheckpointError, match=f"model.moe.{key}=") as error:
            architecture_for({"moe": {"num_experts": 4, "top_k": 2, key: value}})
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.moe.zero_experts=1", "model.moe.groups=2"], "model.moe.groups=2 cannot be combined"),
    (["model.moe.gating_residual=true", "parallel.pp=2", "parallel.dp=1"], "gating_residual=true needs parallel.pp=1"),
    (["model.moe.zero_experts=1", "model.moe.top_k=6"], "model.moe.top_k=6 must not exceed the 5 experts"),
    (["model.moe.num_experts=0", "model.moe.copy_experts=1"], "need an MoE model"),
    (["model.moe.zero_compute_tau=0"], "model.moe.zero_compute_tau' must be positive"),
    (["optim.schedule=linear"], "optim.schedule' must be one of cosine, wsd, constant"),
    (["optim.decay_fraction=1.5"], "optim.decay_fraction' must be between 0 and 1"),
    (["model.moe.renormalize_over=nonzero", "model.moe.renormalize=false"], "renormalize_over=nonzero needs"),
])
def test_recipe_errors_are_one_line(capsys, overrides, message):
    assert main(["train", "model.moe.num_experts=4", "model.moe.top_k=2", *overrides, "--dry-run"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0], error


def test_moepp_run_resumes_bitwise_and_logs_the_share_of_each_kind(tmp_path):
    """MoE++ keys, AdaMoE-style renormalisation, z-loss and the wsd schedule: 3 steps, stop,
    3 more from the checkpoint equal 6 uninterrupted steps bitwise; the metrics give each
    kind's share, FFN experts per token, and tflops that count only the FFN experts that ran."""
    common = [*TINY_MOE, "run.steps=6", "checkpoint.interval=3", "checkpoint.async=false",
              "launch.backend=local", "parallel.dp=1", "model.moe.zero_experts=1", "model.moe.copy_experts=1",
              "model.moe.constant_experts=2", "model.moe.gating_residual=true", "model.moe.zero_compute_tau=0.75",
              "model.moe.z_loss_coef=0.001", "optim.schedule=wsd", "optim.decay_fraction=0.5",
              "optim.warmup_steps=1"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", *common, f"run.dir={whole}"]) == 0
    assert main(["train", *common, "run.stop_at=3", f"run.dir={split}"]) == 0
    assert main(["train", *common, f"run.dir={split}"]) == 0
    assert losses(split) == losses(whole) and len(losses(whole)) == 6
    got, want = final_state(split), final_state(whole)
    assert got.keys() == want.keys()
    assert "model.layers.1.feed_forward.router.residual.weight" in want
    assert "model.layers.0.feed_forward.zero_compute.constant_vector" in want
    for name in want:
        assert torch.equal(got[name], want[name]), name

    rows = read_jsonl(whole / "metrics.jsonl")
    # wsd over 6 steps: warmup 1, stable, then decay over the last 3 (lr 3e-3 by default)
    lr = [row["lr"] for row in rows]
    assert lr[:3] == [pytest.approx(3e-3)] * 3 and lr[3] > lr[4] > lr[5]
    for row in rows:
        shares = [row[f"moe.0.share.{kind}"] for kind in ExpertKinds.NAMES]
        assert sum(shares) == pytest.approx(1.0)
        per_token = [row[f"moe.{layer}.ffn_experts_per_token"] for layer in (0, 1)]
        assert per_token[0] == pytest.approx(2 * row["moe.0.share.ffn"]) and max(per_token) < 2
    assert min(rows[0][f"moe.0.share.{kind}"] for kind in ExpertKinds.NAMES) > 0  # every kind picked
    # tflops: the same model at top_k FFN experts per token would count more FLOPs
    from atoll.trainer.config import load_recipe
    from atoll.trainer.model import Transformer
    from atoll.trainer.train import flops_per_token
    from atoll.trainer.config import model_config

    cfg = load_recipe(None, common)
    with torch.device("meta"):
        model = Transformer(model_config(cfg))
    last = rows[-1]
    ran = last["moe.0.ffn_experts_per_token"] + last["moe.1.ffn_experts_per_token"]
    flops = flops_per_token(model, cfg, ran)
    assert last["tflops"] == pytest.approx(flops * last["tokens_per_s"] / 1e12)
    assert flops < flops_per_token(model, cfg) == pytest.approx(flops_per_token(model, cfg, 4.0))
