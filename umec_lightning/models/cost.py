"""Per-sample forward FLOPs and parameter counts, read off a built model's real modules.

Counting conventions (method.md §3):
  Linear in->out:   2·in·out + out FLOPs (multiply-adds plus bias); in·out + out parameters.
  Factored in->r->out (a layer of `layer_ranks`): its two Linears, 2·in·r + r + 2·r·out + out FLOPs and
                    in·r + r + r·out + out parameters (a ReLU between the factors is not counted).
  Embedding table:  0 FLOPs (one id per sample: a row copy); rows·r parameters, r its stored width
                    (`table_params` counts exactly these).
  Projection r->d:  (a table stored at rank r < d) 2·r·d FLOPs and r·d parameters; with
                    `projection_bias` d more of each.
  dot interaction:  2·D FLOPs per kept pair (one D-long dot product); `cat`: 0.
  ReLU and the final sigmoid are not counted.
Everything is read from the modules themselves (weight shapes, the kept-pair buffer), so a number
reported for a compressed model is measured on that model, never inferred from masks or configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .dlrm import Factored

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


def linear_flops(in_features: int, out_features: int, bias: bool = True) -> int:
    return 2 * in_features * out_features + (out_features if bias else 0)


def _linears(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear of the MLPs: a plain layer, or both factors of a `Factored` one."""
    out = []
    for layer in model.linear_layers().values():
        out += [layer.first, layer.second] if isinstance(layer, Factored) else [layer]
    return out


def _table_numel(table) -> int:
    """Stored values of a table: a float one's weight, or a row-wise quantized one's rows × width (`quant.sparse`:
    what it stores in codes, counted as values so that params mean the same whatever the storage type; its bytes
    are `quant.apply.model_bytes`')."""
    weight = getattr(table, "weight", None)
    return weight.numel() if weight is not None else table.codes.shape[0] * table.dim


def measure(model: nn.Module) -> Cost:
    """Cost of a model of any family (`models.family`) from its modules (see module docstring): its Linears
    (`linear_layers()`), tables and projections (`sparse`), what its interaction computes outside Linears
    (`interaction_flops()`) and holds outside both (`extra_params()`)."""
    linears = _linears(model)
    flops = sum(linear_flops(m.in_features, m.out_features, m.bias is not None) for m in linears)
    mlp_params = sum(m.weight.numel() + (0 if m.bias is None else m.bias.numel()) for m in linears)
    table_params = sum(_table_numel(t) for t in model.sparse.tables.values())
    projection_params = 0
    for p in model.sparse.projections.values():
        bias = 0 if p.bias is None else p.bias.numel()
        flops += 2 * p.weight.numel() + bias  # one r·d multiply-add per weight (and the bias), per sample
        projection_params += p.weight.numel() + bias
    flops += model.interaction_flops()
    params = mlp_params + table_params + projection_params + model.extra_params()
    return Cost(flops=flops, params=params, table_params=table_params)
