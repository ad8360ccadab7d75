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
A factorised model (`layer_ranks`, `table_ranks`) as built: a factored deep layer as its two Linears in -> r -> out
with bias, a projected table as rows·r params and its projection r -> D_f + 1 (`DeepResourceModel`).
The compression gate (`WDL.dim_gate`) is folded away by extraction and not counted.

As `DCNv2ResourceModel`: sums of products of two width columns and of single widths, one gather, one product and one
(V, T) @ (T, 2) matmul, in float64 (integers below 2**53: exact), on torch tensors or NumPy arrays alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .deep_parts import DeepResourceModel, LinearTerms


class WDLResourceModel(DeepResourceModel):
    """R of a Wide & Deep model under the masks of `sets` (the same order as in `PackedGroups`)."""

    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        s = model.structure
        num_sets = self.num_sets
        source = self._start_layout(s, by_name)

        dim_src = [source(f"dims:{name}", d) for name, d in zip(s.feature_names, s.table_dims)]
        deep = [source(f"neurons:deep.layers.{i}", w) for i, w in enumerate(s.deep)]
        one = source("", 1)
        ranks = [None if s.layer_rank(n) is None else source("", s.layer_rank(n)) for n in s.hidden_names]
        # The width computed per variant, appended after the constants: W'.
        width = num_sets + len(self._consts)
        self._deep_last = deep[-1] if deep else None

        terms = LinearTerms()
        terms.deep_and_head(width, deep, None, one, ranks)  # the head reads the last deep layer (x without one)
        return dict(
            **self._base_tensors(s), **terms.tensors(), dim_src=torch.tensor(dim_src, dtype=torch.long),
            # The wide Linear on the dense block, N → 1 with bias: [FLOPs, params] while the block lives.
            wide=torch.tensor([[2.0 * s.num_dense + 1.0, s.num_dense + 1.0]], dtype=torch.float64),
        )

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        """The cost from what the masks decide: kept (V, S) groups kept per set, feature_kept (V, ud + F) float
        0/1 (None when the feature set is not pruned; no pairs here) -> (2, V) absolute FLOPs, params.
        Tensors with c = self._torch, or NumPy arrays with c = self._numpy."""
        counts = self._counts(kept, c)  # units kept: a dim group may be b dims
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
        m = self._cost(cols, c) + m  # (V, 2)
        # rows·(d' + 1) of every alive table (its looked-up width: the wide column too), or its projected cost
        table_flops, table_params = self._table_cost(table_dims + alive, alive, c)
        return c.stack([m[:, 0] + table_flops, m[:, 1] + table_params])
