"""The learned structure as data: which inputs, neurons, dims and pairs a compressed DLRM keeps.

`Kept` is what ADMM hands to extraction, what `compressed.pt` stores, and what summary.json reports.
Indices always refer to the *dense* (original) model: feature ids index the data's sparse columns,
dims index a table's original columns, neurons index a Linear's original output rows, and pairs use the
original T-row numbering of `dot` (row 0 = bottom output when the dense block is read, row 1+f = table f).
`ranks` names tables (by feature name) and Linear layers (by stable name, "dense.layers.<i>",
"over.layers.<i>", numbering of the model the Kept is applied to): a table's rank caps the stored width of its
kept columns, extraction factorises them to that rank (truncated SVD or a given basis, see `extract`); a
table without an entry keeps its stored width. A Linear's rank r makes extraction store the (pruned) layer
in -> out as two Linears in -> r -> out (see `extract`); a layer without an entry keeps its form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models.structure import plain_dict


@dataclass
class Kept:
    use_dense: bool
    feature_ids: list[int]
    dims: dict[str, list[int]]  # feature name -> kept columns of its table (`dot`: the same list for all)
    neurons: dict[str, list[int]]  # hidden Linear stable name -> kept output rows (never the logit layer)
    pairs: list[tuple[int, int]] | None = None  # `dot`: kept pairs (i, j) in original numbering
    # feature name -> stored width (rank) of its table; Linear stable name -> rank of its factored form
    ranks: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Kept:
        pairs = d.get("pairs")
        return cls(
            use_dense=bool(d["use_dense"]),
            feature_ids=[int(i) for i in d["feature_ids"]],
            dims={k: [int(i) for i in v] for k, v in d["dims"].items()},
            neurons={k: [int(i) for i in v] for k, v in d["neurons"].items()},
            pairs=None if pairs is None else [(int(i), int(j)) for i, j in pairs],
            ranks={k: int(v) for k, v in (d.get("ranks") or {}).items()},  # absent before ranks existed
        )

    @classmethod
    def everything(cls, model) -> Kept:
        """The model's structure expressed as a Kept (nothing removed; factored layers and projected tables
        stay as they are: `extract(model, Kept.everything(model))` rebuilds the same model)."""
        s = model.structure
        hidden = {name: list(range(m.out_features)) for name, m in model.neuron_layers().items()}
        return cls(
            use_dense=s.use_dense,
            feature_ids=list(s.feature_ids),
            dims={name: list(range(d)) for name, d in zip(s.feature_names, s.table_dims)},
            neurons=hidden,
            pairs=s.kept_pairs() if s.interaction == "dot" else None,
        )
