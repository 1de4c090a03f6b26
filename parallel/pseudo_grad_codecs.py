"""How DiLoCo pseudo-gradients go on the wire between islands.

A `Codec` turns a flat fp32 tensor into a uint8 payload and back: `none`
(exact fp32), `bf16`, `int8` (absmax scale per row of `INT8_ROW` values) and
`int4` (bf16 scale per group, two values per byte). Only the payload's size
and its decoded value matter to the caller; this module knows no process
groups.
"""

from __future__ import annotations

import torch

INT8_ROW = 512  # values per int8 scale

class Codec:
    """How a flat fp32 pseudo-gradient goes on the wire; `none` is exact fp32."""

    name = "none"
    lossy = False

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.view(torch.float32)[:numel]


class Bf16Codec(Codec):
    name, lossy = "bf16", True

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return payload.view(torch.bfloat16)[:numel].float()


class Int8Codec(Codec):
    """Per-row absmax: row r is stored as round(x / s_r) with s_r = max|x_r| / 127."""

    name, lossy = "int8", True

    def __init__(self, row: int = INT8_ROW):
        self.row = row

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        rows = _padded(flat, self.row)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        # The padding of the last row is not sent.
        return torch.cat([scale.view(torch.uint8).flatten(), q.view(torch.uint8).flatten()[:flat.numel()]])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nrows = -(-numel // self.row)
        scale = payload[:4 * nrows].view(torch.float32).view(nrows, 1)
        q = _padded(payload[4 * nrows:].view(torch.int8).float(), self.row)
        return (q * scale).flatten()[:numel]


class Int4Codec(Codec):
    """Groups of `group` values, two per byte, scale max|x| / 7 per group (bf16)."""

    name, lossy = "int4", True

    def __init__(self, group: int = 64):
        self.group = group

    def encode(self, flat: torch.Tensor) -> torch.Tensor:
        groups = _padded(flat, self.group)
        scale = (groups.abs().amax(dim=1, keepdim=True) / 7).to(torch.bfloat16)
        safe = scale.float().clamp_min(1e-30)
        q = (torch.round(groups / safe).clamp_(-7, 7) + 8).to(torch.uint8).flatten()
        q = q[:flat.numel() + flat.numel() % 2]  # the padding of the last group is not sent
        packed = q[0::2] | (q[1::2] << 4)
        return torch.cat([scale.view(torch.uint8).flatten(), packed])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        ngroups = -(-numel // self.group)
        scale = payload[:2 * ngroups].view(torch.bfloat16).float().view(ngroups, 1)
        packed = payload[2 * ngroups:]
        q = torch.stack([packed & 0xF, packed >> 4], dim=1).flatten().to(torch.int16) - 8
        return (_padded(q.float(), self.group) * scale).flatten()[:numel]


def _padded(flat: torch.Tensor, width: int) -> torch.Tensor:
    pad = (-flat.numel()) % width
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, width)


def make_codec(name: str, int4_group: int = 64) -> Codec:
    return {"none": Codec, "bf16": Bf16Codec, "int8": Int8Codec,
            "int4": lambda: Int4Codec(int4_group)}[name]()
