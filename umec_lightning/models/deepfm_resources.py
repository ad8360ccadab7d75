"""The resource model R of a DeepFM (models/deepfm.py): per-sample FLOPs and parameters of the DeepFM that the masks
of its group sets would leave, as `models.cost.measure` counts them, for a batch of mask variants at once.

The group sets (their names, kinds and `width` are all this reads; a set absent from `sets` prunes nothing):
    "features" (feature)             groups ["dense"] (iff `use_dense`) + the feature names, in that order
    "dims" (dim, width b)            blocks of b consecutive shared embedding dims
    "neurons:deep.layers.<i>" (neuron)   one group per output row of deep layer i

Liveness (as `deepfm_kept_from_masks`): the dense block is alive iff its feature group is kept; a table iff its
feature group is kept and a shared dim is (D' > 0). With F' alive tables and D' kept dims, x is
W' = N·[dense alive] + F'·D' wide, and:
    first-order Linear    N -> 1 with bias, iff the dense block is alive: 2N + 1 FLOPs, N + 1 params
    deep layer i          Linear (W' | d'_{i-1}) -> d'_i with bias
    head                  Linear (d'_last | W' without a deep network) -> 1 with bias
    FM                    3·F'·D' + D' FLOPs when F' > 0 (`deepfm.fm_flops`)
    tables                rows·(D' + 1) params of every alive table (the first-order column stays), 0 FLOPs.
A factorised model (`layer_ranks`, `table_ranks`) as built: a factored deep layer as its two Linears in -> r -> out
with bias, a projected table as rows·r params and its projection r -> D' + 1 (`DeepResourceModel`).
The compression gate is folded away by extraction and not counted. Arithmetic in float64 (exact integers), on torch
tensors or NumPy arrays alike.
"""

from __future__ import annotations

from types import SimpleNamespace

from torch import Tensor

from .deep_parts import DeepResourceModel


class DeepFMResourceModel(DeepResourceModel):
    """R of a DeepFM under the masks of `sets` (the same order as in `PackedGroups`)."""

    def _layout(self, model, by_name: dict[str, int]) -> dict[str, Tensor]:
        s = model.structure
        source = self._start_layout(s, by_name)
        self._dim = source("dims", s.embedding_dim)
        self._deep = [source(f"neurons:deep.layers.{i}", w) for i, w in enumerate(s.deep)]
        self._ranks = [s.layer_rank(n) for n in s.hidden_names]  # a factored layer's rank, else None
        return self._base_tensors(s)

    def _evaluate(self, kept, feature_kept, pair_kept, c: SimpleNamespace):
        """kept (V, S) groups kept per set, feature_kept (V, ud + F) float 0/1 or None -> (2, V) absolute FLOPs,
        params. Tensors with c = self._torch, or NumPy arrays with c = self._numpy."""
        counts = self._counts(kept, c)  # units kept: a dim group may be b dims
        vectors = c.ones if feature_kept is None else feature_kept
        ud = self.ud
        dim = counts[:, self._dim]  # (V,) D'
        alive = vectors[:, ud:] * (dim > 0)[:, None]  # (V, F)
        tables = alive.sum(1)  # F'
        width = tables * dim  # W' (the dense block added below)
        flops = 3.0 * tables * dim + dim * (tables > 0)
        table_flops, params = self._table_cost(alive * (dim + 1.0)[:, None], alive, c)
        flops = flops + table_flops
        if ud:
            dense = vectors[:, 0]
            width = width + dense * self._num_dense
            flops = flops + dense * (2.0 * self._num_dense + 1.0)
            params = params + dense * (self._num_dense + 1.0)
        previous = width
        for col, rank in zip(self._deep, self._ranks):
            out = counts[:, col]
            for a, b in ((previous, out),) if rank is None else ((previous, rank), (rank, out)):
                flops = flops + 2.0 * a * b + b
                params = params + a * b + b
            previous = out
        flops = flops + 2.0 * previous + 1.0
        params = params + previous + 1.0
        return c.stack([flops, params])
