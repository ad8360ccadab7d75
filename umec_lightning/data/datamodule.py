"""CTRDataModule: whole batches fancy-indexed straight from the cache memmaps.

A dataset item is a whole batch (``DataLoader(batch_size=None)``): no per-sample Python. Training
batches follow a seeded permutation per epoch (``seed + epoch``), each batch's rows sorted for
locality. Under DDP every rank takes a disjoint, equally long share of the batches (the remainder
is dropped for training; evaluation keeps every row, so ranks may differ by one batch).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from umec_lightning.data.cache import build_cache, cache_dir_for
from umec_lightning.data.core import SPLITS, Batch, CacheMeta, DataError, load_meta

log = logging.getLogger(__name__)


class BatchDataset(Dataset):
    """Item ``(epoch, i)`` is the whole batch i of that epoch's order. The memmaps are opened lazily
    in each process (workers do not receive copies of the arrays)."""

    def __init__(self, cache_dir: Path, split: str, rows: int, batch_size: int, shuffle: bool, seed: int):
        self.cache_dir, self.split = Path(cache_dir), split
        self.rows, self.batch_size, self.shuffle, self.seed = rows, batch_size, shuffle, seed
        self.num_batches = math.ceil(rows / batch_size)
        self._arrays = None
        self._perm_epoch, self._perm = None, None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None, "_perm_epoch": None, "_perm": None}

    def _open(self):
        if self._arrays is None:
            self._arrays = tuple(
                np.load(self.cache_dir / f"{self.split}_{k}.npy", mmap_mode="r")
                for k in ("dense", "sparse", "label")
            )
        return self._arrays

    def rows_of(self, epoch: int, i: int) -> np.ndarray | slice:
        lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, self.rows)
        if not self.shuffle:
            return slice(lo, hi)
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.rows)
            self._perm_epoch = epoch
        return np.sort(self._perm[lo:hi])

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, key) -> Batch:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not 0 <= i < self.num_batches:
            raise IndexError(i)
        dense, sparse, label = self._open()
        idx = self.rows_of(epoch, i)
        return Batch(
            dense=torch.from_numpy(np.array(dense[idx], dtype=np.float32)),
            sparse=torch.from_numpy(sparse[idx].astype(np.int64)),
            label=torch.from_numpy(label[idx].astype(np.float32)),
        )


class EpochBatchSampler(DistributedSampler):
    """Yields ``(epoch, batch index)`` for this rank: batches rank, rank + world, ...

    A DistributedSampler subclass so Lightning does not wrap it in another distributed sampler.
    """

    def __init__(self, dataset: BatchDataset, rank: int, world_size: int, drop_remainder: bool):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=drop_remainder)
        n = dataset.num_batches
        usable = (n // world_size) * world_size if drop_remainder else n
        self.indices = list(range(rank, usable, world_size))

    def __iter__(self):
        # Lazy on purpose: the epoch is read when batches are drawn, not when the DataLoader iterator is
        # made. Resuming from an epoch-end checkpoint, Lightning makes the iterator before set_epoch().
        for i in self.indices:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return len(self.indices)


def equal_share_batch_size(rows: int, batch_size: int, world: int, split: str = "eval") -> int:
    """The largest batch size <= `batch_size` that splits `rows` into a multiple of `world` batches, so every
    rank evaluates as many batches (a sharded model's every forward is a collective of all ranks)."""
    for size in range(batch_size, 0, -1):
        if math.ceil(rows / size) % world == 0:
            return size
    raise DataError(f"split {split!r}: {rows} rows cannot give each of {world} ranks as many batches")


def data_file(meta: CacheMeta, split: str) -> str | None:
    """The data file a split's rows came from, as the cache's meta.json records it (None for synthetic data)."""
    source = meta.source or {}
    if "path" in source:
        return str(source["path"])
    paths = source.get("paths") or {}
    found = paths.get(split) or paths.get("all") or paths.get("train")
    return str(found) if found else None


class CTRDataModule(pl.LightningDataModule):
    """Cache-backed batches of a ``source`` (SyntheticCriteo, CriteoTSV, TabularCSV...).

    ``prepare_data`` builds the cache (Lightning calls it on one process per node); ``setup`` loads
    its meta; outside a Trainer call ``ensure_ready()``. ``limit_rows`` caps rows per split, e.g.
    ``{"train": 10_000}``. ``rank``/``world_size`` override the DDP detection (tests, custom loops).
    ``equal_eval_batches``: every rank gets as many evaluation batches (``trainer=torchrec``: each forward
    of a sharded model is a collective, so a rank with one batch more would wait forever).
    """

    def __init__(
        self,
        source,
        cache_root: str = ".cache/umec",
        batch_size: int = 128,
        eval_batch_size: int = 4096,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        limit_rows: dict | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        equal_eval_batches: bool = False,
    ):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise DataError("batch_size / eval_batch_size: must be >= 1")
        unknown = set(limit_rows or {}) - set(SPLITS)
        if unknown:
            raise DataError(f"limit_rows: unknown split(s) {sorted(unknown)}")
        self.source = source
        self.cache_root = cache_root
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        self.limit_rows = dict(limit_rows or {})
        self._rank, self._world_size = rank, world_size
        self.equal_eval_batches = bool(equal_eval_batches)
        self.cache_dir: Path | None = None
        self.meta: CacheMeta | None = None

    def prepare_data(self) -> None:
        build_cache(self.source, self.cache_root)

    def setup(self, stage: str | None = None) -> None:
        if self.meta is not None:
            return
        self.cache_dir = cache_dir_for(self.source, self.cache_root)
        meta = load_meta(self.cache_dir)
        empty = [s for s in SPLITS if meta.rows.get(s, 0) == 0]
        if empty:  # the sources refuse this while building; a cache from elsewhere may still have it
            raise DataError(
                f"{self.cache_dir}: split(s) {', '.join(empty)} have 0 rows; every split needs rows (train"
                f" to fit, val to select checkpoints, test for the report): check data.path, data.split,"
                f" data.val_fraction (data.rows for synthetic data)"
            )
        self.meta = meta
        try:
            self._check_classes()
        except DataError:
            self.meta = None
            raise

    def _check_classes(self) -> None:
        """A split whose rows (as many as `limit_rows` takes) all have one label is refused: its AUC is undefined
        (a test AUC written as NaN), and training on one class learns nothing. Costs one byte a row read, and
        nothing for a whole split whose positive rate the cache recorded."""
        meta = self._need_meta()
        for split in SPLITS:
            n, cap = self.split_rows(split), self.limit_rows.get(split)
            rate = (meta.label_rate or {}).get(split)
            if cap is None and rate is not None:
                positives = round(rate * n)
            else:
                labels = np.load(self.cache_dir / f"{split}_label.npy", mmap_mode="r")
                positives = int(np.count_nonzero(labels[:n]))
            if 0 < positives < n:
                continue
            label = 1 if positives else 0
            where = data_file(meta, split) or self.cache_dir
            if cap is not None and n < meta.rows.get(split, 0):
                raise DataError(
                    f"loader.limit_rows.{split}={cap}: the first {n} rows of split {split!r} of {where} all have"
                    f" label {label}; AUC needs both classes: take more rows"
                )
            raise DataError(
                f"{where}: split {split!r} has {n} rows, all with label {label}; AUC needs both classes and a model"
                f" learns nothing from one: check the label column (data.label) and how the file is split"
            )

    def ensure_ready(self) -> CTRDataModule:
        self.prepare_data()
        self.setup()
        return self

    # --- shapes --------------------------------------------------------------------------------

    def _need_meta(self) -> CacheMeta:
        if self.meta is None:
            raise RuntimeError("CTRDataModule: call prepare_data() and setup() (or ensure_ready()) first")
        return self.meta

    @property
    def table_sizes(self) -> list[int]:
        return list(self._need_meta().table_sizes)

    @property
    def num_dense(self) -> int:
        return len(self._need_meta().dense_names)

    @property
    def num_sparse(self) -> int:
        return len(self._need_meta().sparse_names)

    def split_rows(self, split: str) -> int:
        n = self._need_meta().rows.get(split, 0)
        cap = self.limit_rows.get(split)
        return n if cap is None else min(n, int(cap))

    # --- loaders -------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        if self._rank is not None or self._world_size is not None:
            return int(self._rank or 0), int(self._world_size or 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return 0, 1

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_remainder: bool) -> DataLoader:
        meta = self._need_meta()
        rank, world = self._rank_world()
        rows = self.split_rows(split)
        if not drop_remainder and world > 1:
            # Evaluation keeps every row once; smaller batches so that every rank gets at least one.
            batch_size = max(1, min(batch_size, math.ceil(rows / world)))
            if self.equal_eval_batches:
                batch_size = equal_share_batch_size(rows, batch_size, world, split)
        ds = BatchDataset(self.cache_dir, split, rows, batch_size, shuffle, self.seed)
        sampler = EpochBatchSampler(ds, rank, world, drop_remainder)
        if split == "train" and len(sampler) == 0:
            raise DataError(
                f"{self.cache_dir}: split {split!r} has no batches ({meta.rows.get(split, 0)} rows)"
            )
        return DataLoader(
            ds,
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle, drop_remainder=True)

    def global_train_batches(self, world_size: int):
        """The training batches of `world_size` ranks as one process sees them: global batch k is the k-th
        batch of ranks 0..W-1 (batches kW .. kW+W-1) concatenated, what the W ranks train on together at
        step k (epoch 0's order, like a fresh `train_dataloader()`). A generator, read lazily."""
        self._need_meta()
        ds = BatchDataset(self.cache_dir, "train", self.split_rows("train"), self.batch_size, self.shuffle, self.seed)
        for k in range(ds.num_batches // world_size):
            parts = [ds[(0, k * world_size + r)] for r in range(world_size)]
            yield Batch(dense=torch.cat([p.dense for p in parts]), sparse=torch.cat([p.sparse for p in parts]),
                        label=torch.cat([p.label for p in parts]))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False, drop_remainder=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False, drop_remainder=False)
