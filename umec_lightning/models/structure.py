"""The structure of a DLRM as plain data.

A dense model and every compressed model are the same class built from a `DLRMStructure`: which input
features it reads, how many rows and columns each table has, the MLP widths, and which interaction terms
survive. A compressed model is saved as (structure, state_dict), so it can be rebuilt without the training
config. Shape letters: B batch, F kept sparse features, D embedding dim, P kept dot pairs.

A table may be stored narrower than the vector it feeds the interaction: with `table_ranks[f] = r_f <
table_dims[f] = d_f` its lookup (B, r_f) is followed by a learned projection Linear(r_f, d_f, bias=False)
(mixed-dimension embeddings, Ginart et al. 2019; a low-rank factorised table E ≈ (E V_r) V_rᵀ alike).
With `projection_bias` every projection also has a bias (a centred factorisation E ≈ (E − μ) V_r V_rᵀ + μ).

A Linear layer may be stored factored (low-rank, Yu et al. 2024): `layer_ranks[name] = r` builds the layer
in -> out as Linear(in, r) then Linear(r, out), both with bias (`dlrm.Factored`), with a ReLU between the two
iff `factor_activation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

INTERACTIONS = ("dot", "cat")


def plain_dict(obj) -> dict:
    """A dataclass with an optional `pairs` list of tuples as JSON/torch-safe plain types."""
    d = asdict(obj)
    if d.get("pairs") is not None:
        d["pairs"] = [list(p) for p in d["pairs"]]
    return d


@dataclass
class DLRMStructure:
    """Everything needed to build a DLRM's modules (weights aside).

    sparse_names: names of *all* sparse inputs of the data (the columns of `batch.sparse`).
    feature_ids:  indices into `sparse_names` of the features this model keeps (one table each).
    table_sizes:  rows per kept table (parallel to feature_ids).
    table_dims:   width of each kept table's vector entering the interaction (parallel to feature_ids).
                  `dot` needs them all equal to the bottom MLP's output width.
    table_ranks:  stored width r_f of each kept table (parallel to feature_ids), 1 <= r_f <= table_dims[f];
                  r_f < table_dims[f] means a projection r_f -> table_dims[f] follows the lookup. None: every
                  table is stored at its full width (no projection).
    num_dense:    width of the dense input (13 for Criteo); the dense block is read iff `use_dense`.
    bottom:       output widths of the bottom-MLP layers (e.g. [512, 256, 64, 16]); empty iff not use_dense.
    top:          output widths of the top-MLP layers, the last one is 1 (the logit).
    pairs:        for `dot`, kept interaction pairs (i, j), i > j (i >= j with self_interaction), as rows
                  of T = [bottom_out, e_1 .. e_F]; None means all pairs in the reference order.
    projection_bias: every table projection has a bias (only meaningful with projected tables; normalised
                  to False when no table is projected).
    layer_ranks:  stable Linear name ("dense.layers.<i>", "over.layers.<i>") -> rank r of its factored
                  form in -> r -> out, 1 <= r <= min(in, out). None (an empty dict normalises to it): every
                  Linear is a plain one.
    factor_activation: a ReLU between the two factors of every factored layer (the paper's variant: the
                  factored layer is then no longer a factorisation of the original, fine-tune it).
                  Normalised to False when no layer is factored.
    batch_norm:   stable names of the hidden Linear layers followed by a BatchNorm1d (Linear -> BN -> ReLU ->
                  dropout, FuxiCTR's MLP block); a hidden layer is one followed by a ReLU inside its MLP and
                  another layer of the same MLP (never an MLP's last layer). None (an empty list normalises to
                  it): no batch norm. Only while training: an exported model has it folded into the Linear.
    dropout:      stable hidden-layer name -> dropout probability after its ReLU (training only); None (or
                  every p = 0) normalises to None.
    """

    sparse_names: list[str]
    feature_ids: list[int]
    table_sizes: list[int]
    table_dims: list[int]
    num_dense: int
    bottom: list[int]
    top: list[int]
    interaction: str = "dot"
    self_interaction: bool = False
    use_dense: bool = True
    pairs: list[tuple[int, int]] | None = None
    dense_names: list[str] = field(default_factory=list)
    table_ranks: list[int] | None = None
    projection_bias: bool = False
    layer_ranks: dict[str, int] | None = None
    factor_activation: bool = False
    batch_norm: list[str] | None = None
    dropout: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.feature_ids = [int(i) for i in self.feature_ids]
        self.table_sizes = [int(n) for n in self.table_sizes]
        self.table_dims = [int(d) for d in self.table_dims]
        self.bottom = [int(w) for w in self.bottom]
        self.top = [int(w) for w in self.top]
        if self.table_ranks is not None:
            self.table_ranks = [int(r) for r in self.table_ranks]
        if self.pairs is not None:
            self.pairs = [(int(i), int(j)) for i, j in self.pairs]
        if self.layer_ranks is not None:
            if not isinstance(self.layer_ranks, dict):
                raise ValueError("layer_ranks must be a dict {Linear name: rank}, got "
                                 f"{type(self.layer_ranks).__name__}")
            order = {name: k for k, name in enumerate(self.linear_names())}
            # Canonical order (the model's layer order, unknown names last for `validate` to report).
            self.layer_ranks = {str(k): int(v) for k, v in
                                sorted(self.layer_ranks.items(), key=lambda kv: order.get(str(kv[0]), len(order)))}
        self.projection_bias = bool(self.projection_bias)
        self.factor_activation = bool(self.factor_activation)
        order = {name: k for k, name in enumerate(self.linear_names())}
        if self.batch_norm is not None:
            if isinstance(self.batch_norm, (str, dict)) or not hasattr(self.batch_norm, "__iter__"):
                raise ValueError(f"batch_norm must be a list of Linear names, got {self.batch_norm!r}")
            self.batch_norm = sorted({str(n) for n in self.batch_norm}, key=lambda n: order.get(n, len(order)))
        if self.dropout is not None:
            if not isinstance(self.dropout, dict):
                raise ValueError(f"dropout must be a dict {{Linear name: probability}}, got {self.dropout!r}")
            self.dropout = {str(k): float(v) for k, v in
                            sorted(self.dropout.items(), key=lambda kv: order.get(str(kv[0]), len(order)))}
        self.validate()
        # One canonical form, so that equal models have equal structures.
        if self.table_ranks is not None and self.table_ranks == self.table_dims:
            self.table_ranks = None  # no projection anywhere
        if not self.projected():
            self.projection_bias = False
        if not self.layer_ranks:
            self.layer_ranks = None
            self.factor_activation = False
        if not self.batch_norm:
            self.batch_norm = None
        if self.dropout is not None:
            self.dropout = {k: p for k, p in self.dropout.items() if p > 0} or None

    # ---- derived sizes -------------------------------------------------------------------------
    family = "dlrm"  # a class attribute, not a field: `to_dict` stays as it was (`models.family`)

    @property
    def logit_layer(self) -> str:
        """The stable name of the layer that outputs the logit (never pruned)."""
        return f"over.layers.{len(self.top) - 1}"

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    @property
    def feature_names(self) -> list[str]:
        return [self.sparse_names[i] for i in self.feature_ids]

    @property
    def stored_dims(self) -> list[int]:
        """Columns each kept table stores (its rank when projected, else its full width)."""
        return list(self.table_dims) if self.table_ranks is None else list(self.table_ranks)

    def projected(self) -> list[int]:
        """Positions of the kept tables followed by a projection (stored width < interaction width)."""
        return [f for f, (r, d) in enumerate(zip(self.stored_dims, self.table_dims)) if r < d]

    @property
    def bottom_out(self) -> int:
        """Width of the dense block's vector entering the interaction (0 if the block is dropped)."""
        return self.bottom[-1] if self.use_dense else 0

    @property
    def num_vectors(self) -> int:
        """Rows of T for `dot`: the bottom output (if kept) plus one per kept table."""
        return int(self.use_dense) + self.num_features

    def all_pairs(self) -> list[tuple[int, int]]:
        """Reference DLRM order: for i in rows, for j < i (j <= i with self-interaction)."""
        offset = 1 if self.self_interaction else 0
        return [(i, j) for i in range(self.num_vectors) for j in range(i + offset)]

    def kept_pairs(self) -> list[tuple[int, int]]:
        return self.all_pairs() if self.pairs is None else list(self.pairs)

    @property
    def interaction_out(self) -> int:
        """Width of the top MLP's input."""
        if self.interaction == "dot":
            return self.bottom_out + len(self.kept_pairs())
        return self.bottom_out + sum(self.table_dims)

    @property
    def dim(self) -> int:
        """The shared embedding dim under `dot` (0 if there is nothing to interact)."""
        if self.use_dense:
            return self.bottom[-1]
        return self.table_dims[0] if self.table_dims else 0

    def linear_names(self) -> list[str]:
        """Stable names of every Linear layer of the MLPs (bottom then top)."""
        bottom = [f"dense.layers.{i}" for i in range(len(self.bottom))] if self.use_dense else []
        return bottom + [f"over.layers.{i}" for i in range(len(self.top))]

    def hidden_names(self) -> list[str]:
        """The hidden Linear layers, those that may carry batch norm and dropout: every layer of an MLP
        but its last (the bottom MLP's last feeds the interaction, the top MLP's last is the logit)."""
        bottom = [f"dense.layers.{i}" for i in range(len(self.bottom) - 1)] if self.use_dense else []
        return bottom + [f"over.layers.{i}" for i in range(len(self.top) - 1)]

    def has_batch_norm(self, name: str) -> bool:
        return self.batch_norm is not None and name in self.batch_norm

    def dropout_of(self, name: str) -> float:
        return 0.0 if self.dropout is None else self.dropout.get(name, 0.0)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Stable Linear name -> (in_features, out_features) of the layer (factored or not)."""
        out: dict[str, tuple[int, int]] = {}
        if self.use_dense:
            sizes = [self.num_dense, *self.bottom]
            out.update({f"dense.layers.{i}": (sizes[i], sizes[i + 1]) for i in range(len(self.bottom))})
        sizes = [self.interaction_out, *self.top]
        out.update({f"over.layers.{i}": (sizes[i], sizes[i + 1]) for i in range(len(self.top))})
        return out

    def layer_rank(self, name: str) -> int | None:
        """Rank of Linear `name` if it is stored factored, else None."""
        return None if self.layer_ranks is None else self.layer_ranks.get(name)

    def validate(self) -> None:
        if self.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}, got {self.interaction!r}")
        n = len(self.feature_ids)
        if len(self.table_sizes) != n or len(self.table_dims) != n:
            raise ValueError("feature_ids, table_sizes and table_dims must have the same length")
        if any(i < 0 or i >= len(self.sparse_names) for i in self.feature_ids):
            raise ValueError(f"feature_ids out of range for {len(self.sparse_names)} sparse inputs")
        if len(set(self.feature_ids)) != n:
            raise ValueError("feature_ids must be distinct")
        if any(s <= 0 for s in self.table_sizes) or any(d <= 0 for d in self.table_dims):
            raise ValueError("table sizes and dims must be positive")
        if self.table_ranks is not None:
            if len(self.table_ranks) != n:
                raise ValueError(f"table_ranks has {len(self.table_ranks)} entries for {n} kept tables")
            bad = [(name, r, d) for name, r, d in zip(self.feature_names, self.table_ranks, self.table_dims)
                   if not 1 <= r <= d]
            if bad:
                name, r, d = bad[0]
                raise ValueError(f"table_ranks must satisfy 1 <= rank <= table dim; table {name} has rank {r} "
                                 f"for dim {d}")
        if self.use_dense and (not self.bottom or any(w <= 0 for w in self.bottom)):
            raise ValueError("a model that reads the dense block needs positive bottom-MLP widths")
        if not self.use_dense and self.bottom:
            raise ValueError("bottom must be empty when the dense block is dropped")
        if not self.top or self.top[-1] != 1 or any(w <= 0 for w in self.top):
            raise ValueError(f"top-MLP widths must be positive and end in 1, got {self.top}")
        if self.num_vectors == 0:
            raise ValueError("the model keeps no input at all")
        if self.interaction == "dot":
            dims = set(self.table_dims) | ({self.bottom[-1]} if self.use_dense else set())
            if len(dims) > 1:
                raise ValueError(
                    f"`dot` interaction needs one embedding dim for every table and the bottom output, "
                    f"got {sorted(dims)}"
                )
            if self.pairs is not None:
                valid = set(self.all_pairs())
                bad = [p for p in self.pairs if p not in valid]
                if bad:
                    raise ValueError(f"pairs {bad[:3]} are not valid interaction pairs")
        elif self.pairs is not None:
            raise ValueError("pairs only exist under `dot` interaction")
        if self.layer_ranks:
            check_layer_ranks(self.layer_ranks, self.linear_shapes(), "Linear layers of the structure")

        hidden = set(self.hidden_names())
        for key, names in (("batch_norm", self.batch_norm or []), ("dropout", list(self.dropout or {}))):
            bad = [n for n in names if n not in hidden]
            if bad:
                raise ValueError(f"{key} names {bad[:3]}, which are not hidden layers of the structure "
                                 f"({sorted(hidden, key=self.linear_names().index)}: an MLP's last layer takes "
                                 "neither batch norm nor dropout)")
        bad_p = [(n, p) for n, p in (self.dropout or {}).items() if not 0 <= p < 1]
        if bad_p:
            raise ValueError(f"dropout probabilities must lie in [0, 1), got {bad_p[0][1]} for {bad_p[0][0]}")

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DLRMStructure:
        """Rebuild from `to_dict()`; keys added later (table_ranks, projection_bias, layer_ranks,
        factor_activation, batch_norm, dropout) may be absent: a dict written before them is the same model with
        their defaults."""
        return cls(**d)


def dense_structure(
    *,
    sparse_names: list[str],
    table_sizes: list[int],
    embedding_dim: int,
    bottom: list[int],
    top: list[int],
    num_dense: int,
    interaction: str = "dot",
    self_interaction: bool = False,
    dense_names: list[str] | None = None,
    batch_norm=False,
    dropout=0.0,
) -> DLRMStructure:
    """The uncompressed model: every feature, every table at full `embedding_dim`.

    Data without dense features (Avazu, Frappe, MovieLens) gives a model without the dense block: no
    bottom MLP, whatever `bottom` says, the interaction over the embeddings alone.

    `batch_norm` / `dropout` (see `hidden_layer_settings`): one setting for every hidden layer, one per MLP
    ({bottom: .., top: ..}) or one per layer."""
    if num_dense == 0:
        bottom = []
    if len(table_sizes) != len(sparse_names):
        raise ValueError(f"{len(table_sizes)} table sizes for {len(sparse_names)} sparse features")
    if bottom and bottom[-1] != embedding_dim and interaction == "dot":
        raise ValueError(
            f"`dot` interaction needs the bottom MLP to end in embedding_dim={embedding_dim}, got {bottom}"
        )
    structure = DLRMStructure(
        sparse_names=list(sparse_names),
        feature_ids=list(range(len(sparse_names))),
        table_sizes=list(table_sizes),
        table_dims=[embedding_dim] * len(sparse_names),
        num_dense=num_dense,
        bottom=list(bottom),
        top=list(top),
        interaction=interaction,
        self_interaction=self_interaction,
        use_dense=num_dense > 0,
        dense_names=list(dense_names or []),
    )
    hidden = structure.hidden_names()
    norms = hidden_layer_settings(batch_norm, hidden, "batch_norm", bool)
    rates = hidden_layer_settings(dropout, hidden, "dropout", float)
    return dataclasses.replace(structure, batch_norm=[n for n, on in norms.items() if on],
                               dropout=dict(rates))  # canonical form (None when off) by __post_init__


def check_layer_ranks(layer_ranks: dict[str, int], shapes: dict[str, tuple[int, int]], what: str) -> None:
    """ValueError unless every layer of `layer_ranks` is one of `shapes` ({name: (in, out)}; `what` names them in
    the message) and its rank lies in [1, min(in, out)]."""
    unknown = [name for name in layer_ranks if name not in shapes]
    if unknown:
        raise ValueError(f"layer_ranks name {unknown[:3]}, which are not {what} ({list(shapes)})")
    for name, r in layer_ranks.items():
        n_in, n_out = shapes[name]
        if not 1 <= r <= min(n_in, n_out):
            raise ValueError(f"layer_ranks must satisfy 1 <= rank <= min(in, out); {name} ({n_in} -> {n_out}) has "
                             f"rank {r}")


def hidden_layer_settings(value, hidden: list[str], key: str, kind: type) -> dict:
    """{hidden layer name: setting} from one value for every hidden layer, a dict per MLP
    ({bottom: v, top: v}, a missing MLP: off) or per layer ({"over.layers.0": v, ...}, a missing layer: off; for
    batch norm also a list of the layers that have it).
    ValueError naming `model.<key>` on a name that is not a hidden layer or a value of the wrong kind."""
    off = kind()
    if value is None:
        return {n: off for n in hidden}
    if kind is bool and isinstance(value, (list, tuple)):  # the layers that have it, by name
        value = {str(name): True for name in value}
    if isinstance(value, dict):
        items = {str(k): v for k, v in value.items()}
        mlps = {"bottom": "dense.layers.", "top": "over.layers."}
        if set(items) <= set(mlps):
            out = {n: off for n in hidden}
            for mlp, v in items.items():
                for n in hidden:
                    if n.startswith(mlps[mlp]):
                        out[n] = _setting(v, key, kind)
            return out
        bad = [k for k in items if k not in hidden]
        if bad:
            raise ValueError(f"config key `model.{key}` names {bad[:3]}: give one value, {{bottom: .., top: ..}} or "
                             f"the hidden layers by name ({hidden})")
        return {n: _setting(items.get(n, off), key, kind) for n in hidden}
    v = _setting(value, key, kind)
    return {n: v for n in hidden}


def _setting(value, key: str, kind: type):
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"config key `model.{key}` must be true/false (or one per MLP or layer), got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"config key `model.{key}` must be a probability in [0, 1) (or one per MLP or layer), "
                         f"got {value!r}")
    return float(value)
