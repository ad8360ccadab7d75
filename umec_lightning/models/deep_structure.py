"""What the structures of the deep families (DCNv2, DeepFM, Wide & Deep) share: the table and dense fields'
properties, the deep network's settings by stable name (`deep.layers.<i>`), their checks, the dict form, and the
shared part of the `dense_<name>_structure` builders.

Each family keeps its own dataclass fields (their order is the constructor's and `to_dict`'s); `DeepStructure` is a
plain mixin that reads them: `sparse_names`, `feature_ids`, `table_sizes`, `num_dense`, `deep`, `use_dense`,
`dense_names`, `batch_norm`, `dropout`.
"""

from __future__ import annotations

import dataclasses

from ..config import plain
from .structure import hidden_layer_settings, plain_dict


def deep_layer_names(deep: list[int]) -> list[str]:
    """The stable names of the deep network's layers: `deep.layers.<i>`."""
    return [f"deep.layers.{i}" for i in range(len(deep))]


class DeepStructure:
    """The shared properties and checks of a deep family's structure dataclass (module docstring)."""

    # What `SparseArch` and the shared code read of a structure: every table stored at its full width (no
    # projection), no factored layer, the head as the logit layer.
    table_ranks = None
    projection_bias = False
    layer_ranks = None
    logit_layer = "head"

    def __post_init__(self) -> None:
        if self.batch_norm is not None and not self.batch_norm:
            self.batch_norm = None
        if self.dropout is not None:
            self.dropout = {k: float(v) for k, v in self.dropout.items() if v} or None
        self.validate()

    @property
    def feature_names(self) -> list[str]:
        return [self.sparse_names[i] for i in self.feature_ids]

    @property
    def num_features(self) -> int:
        return len(self.feature_ids)

    def projected(self) -> list[int]:
        return []

    @property
    def hidden_names(self) -> list[str]:
        return deep_layer_names(self.deep)

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
