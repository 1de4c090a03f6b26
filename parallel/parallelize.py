"""Everything applied to a single-device model part before training, in one fixed order.

torchtitan's order, per part (the whole model, or one pipeline stage): expert
parallelism shards the experts, activation checkpointing wraps blocks, then
`torch.compile` compiles them, and data parallelism (FSDP2 or DDP, in the
run's precision) wraps what results. Each concern lives in its own module;
this one only knows the order.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from atoll.parallel.activation_checkpointing import apply_activation_checkpointing
from atoll.parallel.compile import apply_compile
from atoll.parallel.data_parallel import apply_data_parallel, uses_fsdp
from atoll.parallel.expert_parallel import apply_expert_parallel
from atoll.parallel.layout import ParallelMesh
from atoll.parallel.precision import Precision


def parallelize(part: nn.Module, mesh: ParallelMesh, model_cfg, precision: Precision,
                root: Optional[nn.Module] = None,
                materialize: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """The module to train for `part` (a `Transformer` or a stage of one): sharded, wrapped.

    `root` is the module around the part that data parallelism wraps (a pipeline stage's
    module); by default the part itself. `materialize` gives a part built on the meta
    device its storage and values: after FSDP has sharded it, but before DDP wraps it
    (DDP broadcasts the values it wraps).
    """
    apply_expert_parallel(part, mesh)
    apply_activation_checkpointing(part, model_cfg)
    apply_compile(part, model_cfg, log=_print if mesh.env.is_logging_rank else None)
    sharded = uses_fsdp(mesh.layout)
    if materialize is not None and not sharded:
        materialize(part)
    module = apply_data_parallel(part if root is None else root, blocks(part), mesh, precision)
    if materialize is not None and sharded:
        materialize(part)
    return module


def blocks(part: nn.Module) -> Iterable[nn.Module]:
    """The transformer blocks of a part, one FSDP unit each."""
    return list(part.layers.values())


def _print(line: str) -> None:
    print(line, flush=True)
