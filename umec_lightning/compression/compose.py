"""Chaining stages: the structure a model keeps after several compress stages, in the dense numbering.

Each stage's method decides a `Kept` in the numbering of *its input* model (the previous stage's extracted
model). `compose_kept` maps it back through what the previous stages kept, so `compressed.pt` and
summary.json always speak of the original model's features, neurons, dims and pairs.
"""

from __future__ import annotations

from .kept import Kept


def _t_row_to_dense(structure, dense) -> dict[int, int]:
    """`dot` T-row numbering of `structure` -> that of `dense` (row 0 = bottom output when read)."""
    ud, dense_ud = int(structure.use_dense), int(dense.use_dense)
    position = {fid: p for p, fid in enumerate(dense.feature_ids)}
    rows = {0: 0} if ud else {}
    for t, fid in enumerate(structure.feature_ids):
        rows[ud + t] = dense_ud + position[fid]
    return rows


def compose_kept(outer: Kept, inner: Kept, structure, dense) -> Kept:
    """`inner` (numbering of the model `structure` describes, which keeps `outer` of the model `dense`
    describes) expressed in `dense`'s numbering."""
    pairs = None
    if inner.pairs is not None:
        rows = _t_row_to_dense(structure, dense)
        pairs = [(rows[i], rows[j]) for i, j in inner.pairs]
    ranks = {**getattr(outer, "ranks", {}), **getattr(inner, "ranks", {})}
    extra = {"ranks": {n: r for n, r in ranks.items() if n in inner.dims}} if hasattr(inner, "ranks") else {}
    return Kept(
        use_dense=inner.use_dense,
        feature_ids=list(inner.feature_ids),
        dims={name: [outer.dims[name][j] for j in cols] for name, cols in inner.dims.items()},
        neurons={name: [outer.neurons[name][r] for r in rows] for name, rows in inner.neurons.items()},
        pairs=pairs,
        **extra,
    )
