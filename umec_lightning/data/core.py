"""Dataset constants, the error type, the batch and the cache metadata shared by every source."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

NUM_DENSE = 13
NUM_SPARSE = 26
SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data or configuration; the message names the file and 1-based line, or the config key."""


@dataclass
class Batch:
    """One mini-batch. B batch, F sparse features.

    dense: (B, num_dense) float32, already log(1 + max(x, 0)); sparse: (B, F) int64 vocabulary ids;
    label: (B,) float32 in {0, 1}.
    """

    dense: torch.Tensor
    sparse: torch.Tensor
    label: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> Batch:
        return Batch(
            self.dense.to(device, non_blocking=non_blocking),
            self.sparse.to(device, non_blocking=non_blocking),
            self.label.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        return Batch(self.dense.pin_memory(), self.sparse.pin_memory(), self.label.pin_memory())

    def __len__(self) -> int:
        return int(self.label.shape[0])


@dataclass
class CacheMeta:
    """Contents of ``<cache_dir>/meta.json``: what a cache holds and where it came from."""

    dense_names: list[str]
    sparse_names: list[str]
    table_sizes: list[int]
    rows: dict[str, int]
    fingerprint: str
    source: dict
    name: str
    oracle_auc: dict[str, float] | None = None
    noise_features: list[str] | None = None
    informative_features: list[str] | None = None
    skipped_lines: int = 0
    label_rate: dict[str, float] | None = None
    # Synthetic data: each sparse feature's planted importance (std of its share of the true logit); optional,
    # so older meta.json files without it still load.
    feature_importance: dict[str, float] | None = None
    # What the cache is checked against each time a run opens it (cache.py, "Cache integrity" in docs/data.md):
    # {"algorithm", "arrays": {file: {"bytes", "digest"}}, "sources": [{"path", "size", "mtime_ns", "ctime_ns",
    # "inode", "digest"}]}. None in a cache built before content digests: such a cache is rebuilt.
    integrity: dict | None = None

    def to_json(self) -> str:
        """Strict JSON: an undefined figure (the oracle AUC of a one-class split) is null, never a bare NaN."""
        from umec_lightning.io import finite_json

        return json.dumps(finite_json(dataclasses.asdict(self))[0], indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict) -> CacheMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_meta(cache_dir: str | Path) -> CacheMeta:
    """Read ``meta.json`` of a built cache; DataError if it is missing or unreadable."""
    path = Path(cache_dir) / "meta.json"
    try:
        return CacheMeta.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DataError(f"{path}: no cache metadata (cache not built yet?)") from None
    except (json.JSONDecodeError, TypeError) as e:
        raise DataError(f"{path}: unreadable cache metadata ({e})") from None
