"""Per-sample forward FLOPs and parameter counts, read off a built model's real modules.

Counting conventions (method.md §3):
  Linear in->out:   2·in·out + out FLOPs (multiply-adds plus bias); in·out + out parameters.
  EmbeddingBag:     0 FLOPs (one id per sample: a row copy); rows·r parameters, r its stored width
                    (`table_params` counts exactly these).
  Projection r->d:  (a table stored at rank r < d) 2·r·d FLOPs (no bias); r·d parameters.
  dot interaction:  2·D FLOPs per kept pair (one D-long dot product); `cat`: 0.
  ReLU and the final sigmoid are not counted.
Everything is read from the modules themselves (weight shapes, the kept-pair buffer), so a number
reported for a compressed model is measured on that model, never inferred from masks or configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

BYTES_PER_PARAM = 4  # fp32


@dataclass(frozen=True)
class Cost:
    flops: int
    params: int
    table_params: int

    @property
    def bytes(self) -> int:
        return self.params * BYTES_PER_PARAM

    @property
    def table_bytes(self) -> int:
        return self.table_params * BYTES_PER_PARAM


def linear_flops(in_features: int, out_features: int) -> int:
    return 2 * in_features * out_features + out_features


def measure(model: nn.Module) -> Cost:
    """Cost of a `DLRM` from its modules (see module docstring)."""
    flops = sum(linear_flops(m.in_features, m.out_features) for m in model.linear_layers().values())
    mlp_params = sum(m.weight.numel() + m.bias.numel() for m in model.linear_layers().values())
    table_params = sum(t.weight.numel() for t in model.sparse.tables.values())
    projection_params = sum(p.weight.numel() for p in model.sparse.projections.values())
    flops += 2 * projection_params  # one r·d multiply-add per weight, per sample
    inter = model.interaction
    if inter.kind == "dot":
        flops += 2 * model.structure.dim * int(inter.li.numel())
    gate = 0 if model.dim_gate is None else model.dim_gate.numel()
    params = mlp_params + table_params + projection_params + gate
    return Cost(flops=flops, params=params, table_params=table_params)
