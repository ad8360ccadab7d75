"""The resource model R of a DCNv2 (models/dcnv2.py): per-sample FLOPs and parameters of the DCNv2 that the masks
of its group sets would leave, as `models.cost.measure` counts them, for a batch of mask variants at once.

The group sets (their names, kinds and `width` are all this reads; a set absent from `sets` prunes nothing):
    "features" (feature)             groups ["dense"] (iff `use_dense`) + the feature names, in that order
    "dims:<feature>" (dim, width b)  blocks of b consecutive columns of that table
    "neurons:deep.layers.<i>" (neuron)   one group per output row of deep layer i

Liveness (as DLRM's): the dense block is alive iff its feature group is kept; a table is alive iff its feature
group is kept and it keeps at least one dim (kept groups × b). The kept width of x0 is
    W' = num_dense·[dense alive] + Σ_{alive tables} kept dims,
and every Linear follows it and the deep layers' kept neuron counts (2·in·out + out-if-bias FLOPs, in·out +
out-if-bias params):
    cross layer, full rank   Linear W'→W' with bias
    cross layer, mixture     per expert V (W'→r), C (r→r), U (r→W'), gate (W'→1), no bias; a shared bias (W',)
    deep layer i             Linear (W' | d'_{i-1}) → d'_i with bias (on x0 or on the cross output: both W' wide)
    head                     Linear → 1 with bias, on W' + d'_last (parallel), d'_last (stacked, or no cross
                             layer), W' (no deep network)
    tables                   rows·kept dims params of every alive table, 0 FLOPs.
    dense block's norm       2·num_dense params iff the block is alive (`dense_norm: batch`), 0 FLOPs.
A factorised DCNv2 (`layer_ranks`, `table_ranks`) as built: a factored cross matrix or deep layer as its two Linears
in -> r -> out with bias, a projected table as rows·r params and its projection r -> D_f (`DeepResourceModel`).

Every cost is a sum of products of two widths (a column of per-variant widths each) and of single widths,
so `_evaluate` is one gather, one product and one (V, T) @ (T, 2) matmul over a column table, in float64
(integers below 2**53: exact, whatever the order of the sums), on torch tensors or NumPy arrays alike.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from .deep_parts import DeepResourceModel, LinearTerms


class DCNv2ResourceModel(DeepResourceModel):
    """R of a DCNv2 under the masks of `sets` (the same order as in `PackedGroups`)."""

    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        s = model.structure
        num_sets = self.num_sets
        source = self._start_layout(s, by_name)

        dim_src = [source(f"dims:{name}", d) for name, d in zip(s.feature_names, s.table_dims)]
        deep = [source(f"neurons:deep.layers.{i}", w) for i, w in enumerate(s.deep)]
        one = source("", 1)
        rank = source("", s.cross_rank) if s.cross_rank is not None else None

        def rank_col(name: str) -> int | None:  # a factored layer's rank: a constant column
            r = s.layer_rank(name)
            return None if r is None else source("", r)

        cross_ranks = [rank_col(f"cross.layers.{i}.linear") for i in range(s.cross_layers)]
        deep_ranks = [rank_col(name) for name in s.hidden_names]
        # Two widths computed per variant, appended after the constants: W' and the head's input width.
        width = num_sets + len(self._consts)
        head_in = width + 1
        self._deep_last = deep[-1] if deep else None
        self._parallel = s.stacking == "parallel" and s.cross_layers > 0

        terms = LinearTerms()  # [FLOPs, params] per unit of a product of two width columns, and of one
        self._dense_norm = float(s.dense_norm_params)  # params of the dense block's norm, iff the block is alive
        layers = s.cross_layers
        if s.cross_rank is None:
            for r in cross_ranks:
                terms.layer(width, width, r)
        else:
            per = layers * s.experts
            terms.linear(width, rank, False, per)  # V_k
            terms.linear(rank, rank, False, per)  # C_k
            terms.linear(rank, width, False, per)  # U_k
            terms.linear(width, one, False, per)  # the gate g_k
            terms.add(terms.singles, width, 0.0, float(layers))  # the shared bias b_l (`extra_params`)
        terms.deep_and_head(width, deep, head_in, one, deep_ranks)
        return dict(**self._base_tensors(s), **terms.tensors(), dim_src=torch.tensor(dim_src, dtype=torch.long))

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        """The cost from what the masks decide: kept (V, S) groups kept per set, feature_kept (V, ud + F) float
        0/1 (None when the feature set is not pruned; no pairs here) -> (2, V) absolute FLOPs, params.
        Tensors with c = self._torch, or NumPy arrays with c = self._numpy."""
        counts = self._counts(kept, c)  # units kept: a dim group may be b dims
        kept_vectors = c.ones if feature_kept is None else feature_kept
        ud = self.ud
        dims = c.take(counts, c.dim_src)  # (V, F) kept dims per table
        alive = kept_vectors[:, ud:] * (dims > 0)
        table_dims = alive * dims  # 0 for a dead table
        width = table_dims.sum(1)[:, None]  # (V, 1): W'
        if ud:
            width = width + kept_vectors[:, :1] * self._num_dense
        if self._deep_last is None:
            head_in = width
        else:
            deep_last = counts[:, self._deep_last : self._deep_last + 1]
            head_in = width + deep_last if self._parallel else deep_last
        cols = c.cat([counts, width, head_in], 1)
        m = self._cost(cols, c)  # (V, 2)
        table_flops, table_params = self._table_cost(table_dims, alive, c)
        params = m[:, 1] + table_params
        if ud and self._dense_norm:
            params = params + kept_vectors[:, 0] * self._dense_norm
        return c.stack([m[:, 0] + table_flops, params])
