"""What the structures of the deep families (DCNv2, DeepFM, Wide & Deep) share: the table and dense fields'
properties, the deep network's settings by stable name (`deep.layers.<i>`), their checks, the dict form, and the
shared part of the `dense_<name>_structure` builders.

Each family keeps its own dataclass fields (their order is the constructor's and `to_dict`'s); `DeepStructure` is a
plain mixin that reads them: `sparse_names`, `feature_ids`, `table_sizes`, `num_dense`, `deep`, `use_dense`,
`dense_names`, `batch_norm`, `dropout`, and the factorisation's `table_ranks`, `projection_bias`, `layer_ranks`,
`factor_activation` (as `DLRMStructure`'s; a dict saved before them loads with their defaults: unfactorised).

Tables. A table's looked-up vector is `lookup_dims[f]` wide: its embedding (`table_dims[f]`) and, for DeepFM and
Wide & Deep, the feature's first-order weight after it (`lookup_extra` = 1). `table_ranks[f]` = r < lookup_dims[f]
stores the table at rank r, followed by a projection r -> lookup_dims[f] (`SparseArch`'s `Projection`, built from
`LookupView`): the projection restores the whole looked-up vector, first-order weight included.

Layers. `layer_ranks` names the factorisable Linears (`linear_shapes()`: the deep layers, and DCNv2's full-rank cross
matrices `cross.layers.<i>.linear`), each then a `Factored` in -> r -> out; the head (`logit_layer`) never is.
"""

from __future__ import annotations

import dataclasses

from ..config import plain
from .structure import check_layer_ranks, hidden_layer_settings, plain_dict


def deep_layer_names(deep: list[int]) -> list[str]:
    """The stable names of the deep network's layers: `deep.layers.<i>`."""
    return [f"deep.layers.{i}" for i in range(len(deep))]


class LookupView:
    """What `SparseArch` reads of a deep structure, with `table_dims` the looked-up widths (`lookup_dims`: a
    projection r -> lookup width restores the first-order column too)."""

    def __init__(self, s):
        self.feature_names = s.feature_names
        self.feature_ids = list(s.feature_ids)
        self.table_sizes = list(s.table_sizes)
        self.table_dims = s.lookup_dims
        self.stored_dims = s.stored_dims
        self.projection_bias = s.projection_bias
        self._projected = s.projected()

    def projected(self) -> list[int]:
        return list(self._projected)


class DeepStructure:
    """The shared properties and checks of a deep family's structure dataclass (module docstring)."""

    logit_layer = "head"  # the layer that outputs the logit: never pruned, never factorised
    lookup_extra = 0  # columns of a looked-up vector past the embedding (DeepFM, Wide & Deep: the first-order weight)

    def __post_init__(self) -> None:
        if self.batch_norm is not None and not self.batch_norm:
            self.batch_norm = None
        if self.dropout is not None:
            self.dropout = {k: float(v) for k, v in self.dropout.items() if v} or None
        if self.table_ranks is not None:
            self.table_ranks = [int(r) for r in self.table_ranks]
        if self.layer_ranks is not None:
            if not isinstance(self.layer_ranks, dict):
                raise ValueError("layer_ranks must be a dict {Linear name: rank}, got "
                                 f"{type(self.layer_ranks).__name__}")
            self.layer_ranks = {str(k): int(v) for k, v in self.layer_ranks.items()}
        self.projection_bias = bool(self.projection_bias)
        self.factor_activation = bool(self.factor_activation)
        self.validate()
        self.validate_factoring()
        # One canonical form, so that equal models have equal structures (as `DLRMStructure`'s).
        if self.table_ranks is not None and self.table_ranks == self.lookup_dims:
            self.table_ranks = None  # no projection anywhere
        if not self.projected():
            self.projection_bias = False
        if self.layer_ranks:
            order = {name: k for k, name in enumerate(self.linear_shapes())}
            self.layer_ranks = dict(sorted(self.layer_ranks.items(), key=lambda kv: order[kv[0]]))
        else:
            self.layer_ranks = None
            self.factor_activation = False

    @property
    def feature_names(self) -> list[str]:
        return [self.sparse_names[i] for i in self.feature_ids]

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    @property
    def lookup_dims(self) -> list[int]:
        """The width of each table's looked-up vector (after its projection, if any): embedding + `lookup_extra`."""
        return [d + self.lookup_extra for d in self.table_dims]

    @property
    def stored_dims(self) -> list[int]:
        """The width each table stores: its rank where projected (`table_ranks`), else its looked-up width."""
        return self.lookup_dims if self.table_ranks is None else list(self.table_ranks)

    def projected(self) -> list[int]:
        """Positions of the tables followed by a projection (stored width < looked-up width)."""
        return [f for f, (r, d) in enumerate(zip(self.stored_dims, self.lookup_dims)) if r < d]

    @property
    def hidden_names(self) -> list[str]:
        return deep_layer_names(self.deep)

    @property
    def deep_in(self) -> int:
        """Width of the deep network's input (its first layer's in_features)."""
        raise NotImplementedError

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """The Linears `layer_ranks` may name (the factorisable ones), name -> (in_features, out_features): the
        deep layers (and a family's own, `extra_linear_shapes`), in the model's order."""
        out = self.extra_linear_shapes()
        sizes = [self.deep_in, *self.deep]
        out.update({name: (sizes[i], sizes[i + 1]) for i, name in enumerate(self.hidden_names)})
        return out

    def extra_linear_shapes(self) -> dict[str, tuple[int, int]]:
        return {}

    def layer_rank(self, name: str) -> int | None:
        """Rank of Linear `name` if it is stored factored, else None."""
        return None if self.layer_ranks is None else self.layer_ranks.get(name)

    def validate_factoring(self) -> None:
        """The checks of `table_ranks` (1 <= r <= looked-up width) and `layer_ranks` (factorisable layers,
        1 <= r <= min(in, out)), as `DLRMStructure.validate`'s."""
        if self.table_ranks is not None:
            n = len(self.feature_ids)
            if len(self.table_ranks) != n:
                raise ValueError(f"table_ranks has {len(self.table_ranks)} entries for {n} kept tables")
            bad = [(name, r, d) for name, r, d in zip(self.feature_names, self.table_ranks, self.lookup_dims)
                   if not 1 <= r <= d]
            if bad:
                name, r, d = bad[0]
                raise ValueError(f"table_ranks must satisfy 1 <= rank <= looked-up width; table {name} has rank {r} "
                                 f"for width {d}")
        if self.layer_ranks:
            check_layer_ranks(self.layer_ranks, self.linear_shapes(),
                              f"factorisable Linear layers of the structure (the head `{self.logit_layer}` never is)")

    def has_batch_norm(self, name: str) -> bool:
        return self.batch_norm is not None and name in self.batch_norm

    def dropout_of(self, name: str) -> float:
        return 0.0 if self.dropout is None else float(self.dropout.get(name, 0.0))

    def validate(self) -> None:
        raise NotImplementedError

    def validate_deep(self) -> None:
        """The deep network's checks: positive widths, batch-norm and dropout settings of deep layers alone."""
        if any(w <= 0 for w in self.deep):
            raise ValueError(f"config key `model.deep` must list positive widths, got {self.deep}")
        hidden = set(self.hidden_names)
        for name in (self.batch_norm or []) + list(self.dropout or {}):
            if name not in hidden:
                raise ValueError(f"batch_norm/dropout names {name!r}, which is not a deep layer ({sorted(hidden)})")

    def to_dict(self) -> dict:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """Rebuild from `to_dict()`; keys added later (table_ranks, projection_bias, layer_ranks, factor_activation,
        dense_norm) may be absent: a dict written before them is the same model with their defaults."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})


def dense_deep_fields(sparse_names: list[str], table_sizes: list[int], num_dense: int, deep: list[int],
                      dense_names: list[str] | None, batch_norm, dropout) -> dict:
    """The fields every dense deep-family structure sets alike: one table per feature of the data, the dense block
    iff there is one, the deep widths and their batch-norm and dropout settings (`hidden_layer_settings`)."""
    hidden = deep_layer_names(deep)
    norms = hidden_layer_settings(batch_norm, hidden, "batch_norm", bool)
    drops = hidden_layer_settings(dropout, hidden, "dropout", float)
    return dict(sparse_names=list(sparse_names), feature_ids=list(range(len(sparse_names))),
                table_sizes=list(table_sizes), num_dense=num_dense, deep=list(deep), use_dense=num_dense > 0,
                dense_names=dense_names, batch_norm=[n for n, on in norms.items() if on] or None,
                dropout={n: p for n, p in drops.items() if p} or None)


def dense_config_args(model_cfg, meta) -> dict:
    """The `dense_<name>_structure` arguments every deep family reads alike from `model` and the data's meta: the
    tables, the embedding width, the dense block and the deep network's settings."""
    return dict(sparse_names=list(meta.sparse_names), table_sizes=list(meta.table_sizes),
                embedding_dim=int(model_cfg.embedding_dim), num_dense=len(meta.dense_names),
                deep=list(model_cfg.get("deep") or []), dense_names=list(meta.dense_names),
                batch_norm=plain(model_cfg.get("batch_norm")), dropout=plain(model_cfg.get("dropout")))
