"""Quantization-aware training of the tables: each looked-up row is fake-quantized at its table's bit width.

Row-wise quantization (`quant.rowwise`) treats every stored row on its own (its own scale and bias), so quantizing
the rows a batch looks up is exactly quantizing the table and then looking up: training sees the values the
quantized model will serve, at the cost of the batch's rows only (never the whole table), and the straight-through
estimator passes the gradient to the float rows unchanged (sparse gradients stay sparse).

The hook sits on each `TableGroup` of `model.sparse` (its output (T_g, B, d_g) holds stored rows: before any rank-r
projection, with DeepFM's and W&D's first-order column), so it serves every model family. Tables sharded by
torchrec have no `TableGroup` in the process: `fake_quantize_tables` refuses them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.dlrm import TableGroup
from .rowwise import check_bits, fake_quantize_rows


def _group_hook(bits: list[int]):
    """A forward hook fake-quantizing a group's (T_g, B, d_g) output, table t at bits[t]."""
    if len(set(bits)) == 1:
        b = bits[0]

        def one_width(module, args, out):
            return fake_quantize_rows(out.reshape(-1, out.shape[-1]), b).view_as(out)

        return one_width

    def per_table(module, args, out):
        return torch.stack([fake_quantize_rows(out[t], b) for t, b in enumerate(bits)])

    return per_table


def fake_quantize_tables(model: nn.Module, bits: dict[str, int]) -> list:
    """Install the hooks on `model.sparse` (bits: feature name -> 32 / 16 / 8 / 4; a missing name stays fp32).
    Returns the hook handles (`remove_hooks`). ValueError for an unknown feature, a bad width, or tables that are
    not held as `TableGroup`s in this process (torchrec's sharded tables)."""
    sparse = model.sparse
    if not list(sparse.feature_names):  # pruning removed every table: nothing to quantize
        return []
    groups = [g for g in getattr(sparse, "groups", []) if isinstance(g, TableGroup)]
    if not groups:
        raise ValueError("quantization-aware training needs the model's tables in this process (TableGroups); "
                         "trainer=torchrec shards them: quantize after training instead (post-training)")
    names = list(sparse.feature_names)
    unknown = sorted(set(bits) - set(names))
    if unknown:
        raise ValueError(f"quantization-aware training: {unknown} are not features of the model ({names[:6]}…)")
    handles = []
    for group in groups:
        widths = [check_bits(int(bits.get(names[f], 32))) for f in group.positions]
        if all(b == 32 for b in widths):
            continue
        handles.append(group.register_forward_hook(_group_hook(widths)))
    return handles


def remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()
