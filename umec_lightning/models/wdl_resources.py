"""The resource model R of a Wide & Deep model (models/wdl.py): per-sample FLOPs and parameters of the model that
the masks of its group sets would leave, as `models.cost.measure` counts them, for a batch of mask variants at once.

The group sets (their names, kinds and `width` are all this reads; a set absent from `sets` prunes nothing):
    "features" (feature)             groups ["dense"] (iff `use_dense`) + the feature names, in that order
    "dims:<feature>" (dim, width b)  blocks of b consecutive embedding columns of that table
    "neurons:deep.layers.<i>" (neuron)   one group per output row of deep layer i

Liveness (as `wdl_kept_from_masks`): the dense block is alive iff its feature group is kept; a table iff its feature
group is kept (with 0 kept dims it keeps its wide column). The kept width of x is
    W' = num_dense·[dense alive] + Σ_{alive tables} kept dims,
and
    deep layer i     Linear (W' | d'_{i-1}) → d'_i with bias
    head             Linear (d'_last | W' without a deep network) → 1 with bias
    wide Linear      num_dense → 1 with bias, iff the dense block is alive (else its bias is folded into the head's)
    tables           rows·(kept dims + 1) params of every alive table, 0 FLOPs.
The compression gate (`WDL.dim_gate`) is folded away by extraction and not counted.

As `DCNv2ResourceModel`: sums of products of two width columns and of single widths, one gather, one product and one
(V, T) @ (T, 2) matmul, in float64 (integers below 2**53: exact), on torch tensors or NumPy arrays alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from ..compression.resource import GroupResourceModel


class WDLResourceModel(GroupResourceModel):
    """R of a Wide & Deep model under the masks of `sets` (the same order as in `PackedGroups`)."""

    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        s = model.structure
        num_sets = self.num_sets
        self.ud = int(s.use_dense)
        self._num_dense = float(s.num_dense)
        self._num_vectors = self.ud + len(s.feature_ids)

        consts: list[float] = []

        def source(set_name: str, full: int) -> int:
            """Column of the width table: the set's kept units if the set is active, else a constant."""
            if set_name in by_name:
                return by_name[set_name]
            consts.append(float(full))
            return num_sets + len(consts) - 1

        dim_src = [source(f"dims:{name}", d) for name, d in zip(s.feature_names, s.table_dims)]
        deep = [source(f"neurons:deep.layers.{i}", w) for i, w in enumerate(s.deep)]
        one = source("", 1)
        # The width computed per variant, appended after the constants: W'.
        width = num_sets + len(consts)
        self._deep_last = deep[-1] if deep else None

        products: dict[tuple[int, int], list[float]] = {}
        singles: dict[int, list[float]] = {}

        def add(table: dict, key, flops: float, params: float) -> None:
            entry = table.setdefault(key, [0.0, 0.0])
            entry[0] += flops
            entry[1] += params

        def linear(a: int, b: int) -> None:  # with bias
            add(products, (a, b), 2.0, 1.0)
            add(singles, b, 1.0, 1.0)

        previous = width
        for col in deep:
            linear(previous, col)
            previous = col
        linear(previous, one)  # the head

        coef = torch.tensor([*products.values(), *singles.values()], dtype=torch.float64)

        def long(x):
            return torch.tensor(x, dtype=torch.long)

        return dict(
            consts=torch.tensor(consts, dtype=torch.float64)[None, :],
            widths=torch.tensor([[float(gs.width) for gs in self.sets]], dtype=torch.float64),
            left=long([a for a, _ in products]), right=long([b for _, b in products]), single=long(list(singles)),
            coef=coef, dim_src=long(dim_src), rows=torch.tensor(s.table_sizes, dtype=torch.float64),
            ones=torch.ones(1, self._num_vectors, dtype=torch.float64),
            # The wide Linear on the dense block, N → 1 with bias: [FLOPs, params] while the block lives.
            wide=torch.tensor([[2.0 * s.num_dense + 1.0, s.num_dense + 1.0]], dtype=torch.float64),
        )

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        """The cost from what the masks decide: kept (V, S) groups kept per set, feature_kept (V, ud + F) float
        0/1 (None when the feature set is not pruned; no pairs here) -> (2, V) absolute FLOPs, params.
        Tensors with c = self._torch, or NumPy arrays with c = self._numpy."""
        v = kept.shape[0]
        counts = c.cat([kept * c.widths, c.tile(c.consts, v)], 1)  # units kept: a dim group may be b dims
        kept_vectors = c.ones if feature_kept is None else feature_kept
        ud = self.ud
        alive = kept_vectors[:, ud:]  # (V | 1, F)
        table_dims = alive * c.take(counts, c.dim_src)  # (V, F) kept dims of every table, 0 for a dead one
        width = table_dims.sum(1)[:, None]  # (V, 1): W'
        m = 0.0
        if ud:
            dense = kept_vectors[:, :1]
            width = width + dense * self._num_dense
            m = dense @ c.wide  # (V | 1, 2)
        cols = c.cat([counts, width], 1)
        terms = c.cat([c.take(cols, c.left) * c.take(cols, c.right), c.take(cols, c.single)], 1)
        m = terms @ c.coef + m  # (V, 2)
        tables = (table_dims + alive) @ c.rows  # rows·(d' + 1) of every alive table
        return c.stack([m[:, 0], m[:, 1] + tables])
