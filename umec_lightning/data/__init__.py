"""Data engine: sources (synthetic, raw Criteo, any CSV) -> an on-disk cache -> batches."""

from umec_lightning.data.cache import build_cache
from umec_lightning.data.core import NUM_DENSE, NUM_SPARSE, Batch, CacheMeta, DataError, load_meta
from umec_lightning.data.criteo import CriteoTSV
from umec_lightning.data.datamodule import CTRDataModule
from umec_lightning.data.synthetic import SyntheticCriteo, exact_auc
from umec_lightning.data.tabular import TabularCSV

__all__ = [
    "NUM_DENSE",
    "NUM_SPARSE",
    "Batch",
    "CTRDataModule",
    "CacheMeta",
    "CriteoTSV",
    "DataError",
    "SyntheticCriteo",
    "TabularCSV",
    "build_cache",
    "exact_auc",
    "load_meta",
]
