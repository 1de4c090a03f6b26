"""The model built on the meta device and initialised shard by shard has exactly the old values.

The reference is what training did before: the whole `Transformer` built on
the CPU and `init_weights(seed)`. The trainer now builds on the meta device,
shards, then materialises; gathered whole again, every parameter and buffer
must be bitwise the reference's, in one process and under FSDP (with an
uneven dim-0 split and tied embeddings), DDP, expert parallelism and a
pipeline split. Gloo processes build real `Trainer`s.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.distributed.tensor import DTensor

from atoll.trainer.config import load_recipe, model_config
from atoll.trainer.model import Transformer, canonical_name
from conftest import RESULT_TIMEOUT_S, TINY_MOE, free_port, spawned

# An odd vocabulary: the embedding's 257 rows split 129 / 128 over two FSDP ranks.
BASE = [*TINY_MOE, "model.vocab_size=257", "run.seed=7", "run.steps=1", "checkpoint.memory_interval=0"]
LAYOUTS = {
    "fsdp-tied": ["parallel.dp=2", "parallel.dp_shard=fsdp", "model.tie_embeddings=true"],
    "ddp": ["parallel.dp=2", "parallel.dp_shard=ddp"],
    "ep": ["parallel.dp=2", "parallel.ep=2"],
    "pp": ["parallel.pp=2", "parallel.dp=1"],
}


def reference(cfg) -> tuple[dict, dict]:
    """(parameters, buffers) by name of the whole model initialised on the CPU, as before."""
    model = Transformer(model_config(cfg))
    model.init_weights(cfg.run.seed)
    return dict(model.named_parameters()), dict(model.named_buffers())


def held_state(parts) -> tuple[dict, dict]:
    """(parameters gathered whole, buffers) of this rank's model parts, by canonical name."""
    params, buffers = {}, {}
    for part in parts:
        for name, param in part.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            params[canonical_name(name)] = full.detach().cpu().clone()
        for name, buffer in part.named_buffers():
            buffers[canonical_name(name)] = buffer.cpu().clone()
    return params, buffers


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), f"{what} {name}"


def test_meta_model_materialised_equals_cpu_init():
    """Built on the meta device, `to_empty` (storage filled with whatever memory held: set it
    to garbage here), then initialised: parameters, buffers and the tie are the CPU model's."""
    cfg = load_recipe(None, [*BASE, "model.tie_embeddings=true", "model.moe.balance=aux_free"])
    with torch.device("meta"):
        model = Transformer(model_config(cfg))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(7)
    model.init_weights(cfg.run.seed)
    assert model.output.weight is model.tok_embeddings.weight
    params, buffers = held_state([model])
    want_params, want_buffers = reference(cfg)
    assert_bitwise(params, want_params, "parameter")
    assert_bitwise(buffers, want_buffers, "buffer")


def test_one_process_trainer_matches_cpu_init(tmp_path):
    from atoll.trainer.train import Trainer

    cfg = load_recipe(None, [*BASE, "launch.backend=local", "parallel.dp=1", "model.tie_embeddings=true",
                             f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        model = trainer.model
        assert not any(p.is_meta for p in model.parameters())
        assert model.output.weight is model.tok_embeddings.weight  # still tied after to_empty
        params, buffers = held_state(trainer.parts)
        want_params, want_buffers = reference(cfg)
        assert_bitwise(params, want_params, "parameter")
        assert_bitwise(buffers, want_buffers, "buffer")
        trainer.train_step()  # and it trains
    finally:
        trainer.close()


def _build_layouts(rank: int, ports: list[int], run_root: str, results) -> None:
    """One rank: a Trainer per layout, in turn; sends what it holds, gathered whole."""
    from atoll.trainer.train import Trainer

    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1")
        for (name, layout), port in zip(LAYOUTS.items(), ports):
            os.environ["MASTER_PORT"] = str(port)
            cfg = load_recipe(None, [*BASE, *layout, f"run.dir={run_root}/{name}"])
            trainer = Trainer(cfg)
            try:
                state = held_state(trainer.parts)
                tied = [p.output.weight is p.tok_embeddings.weight for p in trainer.parts
                        if p.output is not None and p.tok_embeddings is not None]
                trainer.train_step()  # the materialised model trains under this layout
            finally:
                trainer.close()
            # numpy arrays travel by value (shared tensors would die with this process)
            results.put((rank, name, [{k: v.numpy() for k, v in d.items()} for d in state], tied))
    except BaseException:
        results.put((rank, "error", traceback.format_exc(), None))


@pytest.mark.slow
def test_every_layout_starts_from_the_cpu_init(tmp_path):
    with spawned() as (start, results):
        ports = [free_port() for _ in LAYOUTS]
        for rank in range(2):
            start(_build_layouts, rank, ports, str(tmp_path))
        received: dict = {}
        for _ in range(2 * len(LAYOUTS)):
            rank, name, state, tied = results.get(timeout=RESULT_TIMEOUT_S)
            assert name != "error", state
            received[name, rank] = ([{k: torch.from_numpy(v) for k, v in d.items()} for d in state], tied)
    for name, layout in LAYOUTS.items():
        cfg = load_recipe(None, [*BASE, *layout])
        want_params, want_buffers = reference(cfg)
        (params0, buffers0), tied0 = received[name, 0]
        (params1, buffers1), tied1 = received[name, 1]
        if name == "pp":  # each rank holds its own stage: together they are the model
            assert not params0.keys() & params1.keys()
            params0.update(params1)
            buffers0.update(buffers1)  # and each its stage's buffers (both have the empty rope tables)
        else:
            assert_bitwise(params1, want_params, f"{name} rank 1 parameter")
            assert_bitwise(buffers1, want_buffers, f"{name} rank 1 buffer")
        assert_bitwise(params0, want_params, f"{name} parameter")
        assert_bitwise(buffers0, want_buffers, f"{name} buffer")
        if "model.tie_embeddings=true" in layout:
            assert tied0 == tied1 == [True], name


@pytest.mark.gpu
def test_cuda_trainer_materialises_on_the_gpu(tmp_path):
    """On a GPU: the model built on the meta device lands on CUDA with the CPU init's values,
    AdamW runs fused, and bf16 steps from pinned non-blocking copies give finite losses."""
    from atoll.trainer.train import Trainer

    cfg = load_recipe(None, [*BASE, "launch.backend=local", "parallel.dp=1", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        assert all(p.is_cuda for p in trainer.model.parameters())
        assert all(b.is_cuda for b in trainer.model.buffers())
        params, buffers = held_state(trainer.parts)
        want_params, want_buffers = reference(cfg)
        assert_bitwise(params, want_params, "parameter")
        assert_bitwise(buffers, want_buffers, "buffer")
        assert trainer.optimizers[0].defaults["fused"]
        assert trainer.to_device(torch.ones(2)).is_cuda
        losses = [trainer.train_step().loss for _ in range(2)]
        assert all(torch.isfinite(torch.tensor(losses))), losses
    finally:
        trainer.close()
