"""`model.compile`: torch.compile applied to each transformer block, from outside the model.

Each block's forward is replaced, on the instance, by its compiled version
(`dynamic=False`); no `_orig_mod` wrapper is inserted, so parameter names stay
those of the plain model, and hooks registered on the block (FSDP's
all-gather and reshard) run eagerly around the compiled code. All blocks
share one code object, so the graphs compiled for the first block serve the
others. With activation checkpointing (applied first) what gets compiled is
the function that runs under `checkpoint`, not the checkpointed forward:
torch.compile cannot trace a checkpoint region around the eager calls below
and would otherwise run the whole block eagerly; so the checkpoint itself
stays eager and the compiled block body serves both the forward and its
recompute.

Graph breaks, kept few on purpose (2 per MoE block, none in a dense one):
- the expert computation (`GroupedExperts.forward`, or the expert-parallel
  dispatch that replaces it) runs eagerly under `torch.compiler.disable`: its
  row counts per expert depend on the routing (data-dependent shapes), and
  under expert parallelism it runs all-to-alls with host-side split sizes;
- the MoE routing statistics (`MoE._record_routing`) run eagerly, so the flag
  that activation checkpointing flips in its recompute never becomes a guard.
The first block's graphs and breaks are printed once, on the logging rank.

Shapes are static: a step's shapes never change, so nothing recompiles from
one step (or block) to the next; evaluation (module.training is a guard) and
pipeline shape inference compile their own graphs once.

This module knows the model's blocks and MoE layers, not meshes or ranks.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional

import torch
from torch import nn

from atoll.parallel.activation_checkpointing import is_checkpointed


def apply_compile(part: nn.Module, model_cfg, log: Optional[Callable[[str], None]] = None) -> None:
    """Compile every block of `part` in place; `log` gets one line about the first block's graphs."""
    if not model_cfg.compile:
        return
    for name, block in part.layers.items():
        if is_checkpointed(block):  # compile what runs under checkpoint, which torch.compile skips
            block.checkpointed_body = torch.compile(block.checkpointed_body, dynamic=False)
        else:
            block.forward = torch.compile(block.forward, dynamic=False)
        if name == "0" and log is not None:
            block.forward = _reporting_first_call(block, name, log)


def _reporting_first_call(block: nn.Module, name: str, log: Callable[[str], None]):
    """The block's forward, which on its first call (when it compiles) reports the graphs and
    breaks it made."""
    forward = block.forward

    def first_call(*args, **kwargs):
        breaks_before = Counter(torch._dynamo.utils.counters["graph_break"])
        graphs_before = _graphs_compiled()
        out = forward(*args, **kwargs)
        block.forward = forward  # reported: later calls go straight to the compiled forward
        breaks = Counter(torch._dynamo.utils.counters["graph_break"])
        breaks.subtract(breaks_before)
        # Dynamo may meet one break twice (in the block's frame, then in the frame of the
        # module it could not inline): count break sites, not meetings.
        sites = sorted({_site(reason) for reason, count in breaks.items() if count > 0})
        log(f"compile: block {name} compiled into {_graphs_compiled() - graphs_before} graph(s) with "
            f"{len(sites)} graph break(s)" + (f": {'; '.join(sites)}" if sites else ""))
        return out

    return first_call


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _site(reason: str) -> str:
    """`reason` (dynamo's message) in a few words: what broke, and at which function or op."""
    kind = reason.strip().splitlines()[0].strip()
    where = re.search(r"<function ([\w.]+) at|Operator `([\w.]+)`", reason)
    return f"{kind} ({where.group(1) or where.group(2)})" if where else kind[:100]
