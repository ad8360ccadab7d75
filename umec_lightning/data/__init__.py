"""Data engine: sources (synthetic, raw Criteo, any CSV, libFM) -> an on-disk cache -> batches.

The names below are imported on first use (PEP 562), so ``import umec_lightning`` stays light (it
imports only ``naming``, which registers the ``${umec_data_name:}`` resolver); ``from
umec_lightning.data import CTRDataModule`` and Hydra ``_target_: umec_lightning.data.CriteoTSV`` work
as usual.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "NUM_DENSE": "core",
    "NUM_SPARSE": "core",
    "Batch": "core",
    "CTRDataModule": "datamodule",
    "CacheMeta": "core",
    "CriteoTSV": "criteo",
    "DataError": "core",
    "LibFMText": "libfm",
    "SyntheticCriteo": "synthetic",
    "TabularCSV": "tabular",
    "build_cache": "cache",
    "exact_auc": "synthetic",
    "load_meta": "core",
}
_SUBMODULES = {"cache", "core", "criteo", "datamodule", "libfm", "naming", "synthetic", "tabular", "text"}

__all__ = [
    "NUM_DENSE",
    "NUM_SPARSE",
    "Batch",
    "CTRDataModule",
    "CacheMeta",
    "CriteoTSV",
    "DataError",
    "LibFMText",
    "SyntheticCriteo",
    "TabularCSV",
    "build_cache",
    "exact_auc",
    "load_meta",
]

if TYPE_CHECKING:
    from umec_lightning.data.cache import build_cache
    from umec_lightning.data.core import NUM_DENSE, NUM_SPARSE, Batch, CacheMeta, DataError, load_meta
    from umec_lightning.data.criteo import CriteoTSV
    from umec_lightning.data.datamodule import CTRDataModule
    from umec_lightning.data.libfm import LibFMText
    from umec_lightning.data.synthetic import SyntheticCriteo, exact_auc
    from umec_lightning.data.tabular import TabularCSV


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
