"""`atoll ckpt import --format hf` against transformers itself, for every architecture it reads.

A tiny random model of each (built by transformers, with weights large enough
that logits and routing are far from trivial, and for Glm4Moe a selection bias
that changes which experts are picked) is saved with save_pretrained and
imported by the CLI; atoll's model loaded from that checkpoint must compute
transformers' logits within 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from atoll.checkpoint.store import resolve_checkpoint
from atoll.launch.cli import main
from conftest import checkpoint_model

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=24, num_key_value_heads=2)


def llama():
    """Grouped-query attention."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, num_key_value_heads=2))


def llama_tied():
    """Tied input and output embeddings."""
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=True))


def mixtral():
    config = transformers.MixtralConfig(**{**COMMON, "intermediate_size": 24}, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2)
    return transformers.MixtralForCausalLM(config)


def qwen2_moe():
    """Top-k gates not renormalised, a shared expert (its gate zero: a constant 1/2)."""
    config = transformers.Qwen2MoeConfig(**COMMON, **MOE, num_experts=4, shared_expert_intermediate_size=24,
                                         norm_topk_prob=False, qkv_bias=False)
    model = transformers.Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.shared_expert_gate.weight.zero_()
    return model


def glm4_moe():
    """Sigmoid scores with a selection bias (e_score_correction_bias), a shared expert."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    config = transformers.Glm4MoeConfig(**COMMON, **MOE, n_routed_experts=4, n_shared_experts=1,
                                        first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
                                        routed_scaling_factor=1.0, use_qk_norm=False, rope_parameters=rope)
    model = transformers.Glm4MoeForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.5, 0.5)
    return model


# The import drops `output.weight` of a tied model, while atoll's model (and its own
# checkpoints) hold the tied matrix under both names: neither loading it here nor
# `atoll train checkpoint.resume=...` accepts the imported checkpoint.
@pytest.mark.parametrize("build", [llama, llama_tied, mixtral, qwen2_moe, glm4_moe],
                         ids=["Llama", "Llama-tied", "Mixtral", "Qwen2Moe", "Glm4Moe"])
def test_imported_model_computes_transformers_logits(build, tmp_path, capsys):
    """save_pretrained, `atoll ckpt import`, load into atoll: the logits of transformers'
    model within 1e-5 on random tokens (and, for Glm4Moe, its selection bias in the router)."""
    torch.manual_seed(0)
    theirs = build().eval()
    theirs.save_pretrained(tmp_path / "hf")
    assert main(["ckpt", "import", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "atoll")]) == 0
    assert "train it with" in capsys.readouterr().out
    ours = checkpoint_model(resolve_checkpoint(tmp_path / "atoll"))
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(tokens).logits
        got = ours(tokens)[0]
    assert want.std() > 0.1  # logits far from trivial
    assert (got - want).abs().max().item() <= 1e-5
    if build is glm4_moe:
        bias = ours.layers["0"].feed_forward.router.expert_bias_E
        torch.testing.assert_close(bias, theirs.model.layers[0].mlp.gate.e_score_correction_bias, rtol=0, atol=0)
