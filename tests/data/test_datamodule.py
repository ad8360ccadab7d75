import numpy as np
import pytest
import torch

from umec_lightning.data import Batch, CTRDataModule, DataError


@pytest.fixture()
def dm(small_synthetic, synthetic_cache):
    return CTRDataModule(
        small_synthetic, cache_root=str(synthetic_cache.parent), batch_size=128, eval_batch_size=1000, seed=7
    ).ensure_ready()


def _rows(batches):
    return torch.cat([b.dense for b in batches]).numpy(), torch.cat([b.sparse for b in batches]).numpy()


def _row_keys(dense, sparse):
    both = np.concatenate([dense.view(np.int32), sparse.astype(np.int32)], 1)
    return both[np.lexsort(both.T[::-1])]


def test_shapes_and_dtypes(dm):
    assert dm.num_dense == 13 and dm.num_sparse == 26 and len(dm.table_sizes) == 26
    b = next(iter(dm.train_dataloader()))
    assert isinstance(b, Batch) and len(b) == 128
    assert b.dense.shape == (128, 13) and b.dense.dtype == torch.float32
    assert b.sparse.shape == (128, 26) and b.sparse.dtype == torch.int64
    assert b.label.shape == (128,) and b.label.dtype == torch.float32
    assert b.to("cpu").dense.shape == (128, 13)
    v = list(dm.val_dataloader())
    assert len(v) == 5 and sum(len(x) for x in v) == 5000
    assert len(list(dm.test_dataloader())) == 5


def test_epoch_covers_train_once(dm, synthetic_cache):
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == -(-20_000 // 128)
    dense, sparse = _rows(batches)
    assert len(dense) == 20_000
    ref_dense = np.load(synthetic_cache / "train_dense.npy")
    ref_sparse = np.load(synthetic_cache / "train_sparse.npy")
    np.testing.assert_array_equal(_row_keys(dense, sparse), _row_keys(ref_dense, ref_sparse))
    ds = loader.dataset
    seen = np.concatenate([ds.rows_of(0, i) for i in range(len(ds))])
    np.testing.assert_array_equal(np.sort(seen), np.arange(20_000))
    first = ds.rows_of(0, 0)
    assert (np.diff(first) > 0).all()  # rows sorted within a batch


def test_seeded_order(small_synthetic, synthetic_cache, dm):
    other = CTRDataModule(small_synthetic, cache_root=str(synthetic_cache.parent), seed=7).ensure_ready()
    a, b = next(iter(dm.train_dataloader())), next(iter(other.train_dataloader()))
    assert torch.equal(a.sparse, b.sparse)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)  # Lightning does this every epoch
    c = next(iter(loader))
    assert not torch.equal(a.sparse, c.sparse)
    unshuffled = CTRDataModule(
        small_synthetic, cache_root=str(synthetic_cache.parent), shuffle=False
    ).ensure_ready()
    d = next(iter(unshuffled.train_dataloader()))
    np.testing.assert_array_equal(d.sparse.numpy(), np.load(synthetic_cache / "train_sparse.npy")[:128])


def test_ddp_shards_disjoint(small_synthetic, synthetic_cache):
    kw = {"cache_root": str(synthetic_cache.parent), "batch_size": 128, "seed": 3, "world_size": 2}
    shards = []
    for rank in (0, 1):
        dm = CTRDataModule(small_synthetic, rank=rank, **kw).ensure_ready()
        loader = dm.train_dataloader()
        shards.append([loader.dataset.rows_of(0, i) for _, i in loader.sampler])
    n0, n1 = len(shards[0]), len(shards[1])
    assert n0 == n1 == (-(-20_000 // 128)) // 2
    r0, r1 = np.concatenate(shards[0]), np.concatenate(shards[1])
    assert len(np.intersect1d(r0, r1)) == 0 and len(np.unique(r0)) == len(r0)
    evals = [
        CTRDataModule(small_synthetic, rank=r, eval_batch_size=1000, **kw).ensure_ready().val_dataloader()
        for r in (0, 1)
    ]
    assert sum(len(b) for loader in evals for b in loader) == 5000  # eval keeps every row


def test_global_train_batches_are_the_ranks_batches_together(small_synthetic, synthetic_cache):
    """What rank 0 calibrates on alone under trainer=torchrec: step k's batches of both ranks, concatenated,
    i.e. the rows one process at batch 2·128 trains on at step k."""
    kw = {"cache_root": str(synthetic_cache.parent), "batch_size": 128, "seed": 3, "world_size": 2}
    ranks = [list(CTRDataModule(small_synthetic, rank=r, **kw).ensure_ready().train_dataloader()) for r in (0, 1)]
    glob = list(CTRDataModule(small_synthetic, rank=0, **kw).ensure_ready().global_train_batches(2))
    single = list(CTRDataModule(small_synthetic, cache_root=kw["cache_root"], batch_size=256, seed=3)
                  .ensure_ready().train_dataloader())
    assert len(glob) == len(ranks[0]) == len(ranks[1]) == (-(-20_000 // 128)) // 2
    for k, batch in enumerate(glob):
        assert len(batch) == 256
        assert torch.equal(batch.sparse, torch.cat([ranks[0][k].sparse, ranks[1][k].sparse]))
        assert torch.equal(batch.label, torch.cat([ranks[0][k].label, ranks[1][k].label]))
        if k < len(single) - 1:  # the same rows (in another order) as the one process's step k
            assert np.array_equal(_row_keys(*_rows([batch])), _row_keys(*_rows([single[k]])))


def test_limit_rows_and_workers(small_synthetic, synthetic_cache):
    dm = CTRDataModule(
        small_synthetic,
        cache_root=str(synthetic_cache.parent),
        batch_size=100,
        num_workers=1,
        limit_rows={"train": 1000, "val": 300},
    ).ensure_ready()
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    assert sum(len(b) for b in loader) == 1000
    assert sum(len(b) for b in dm.val_dataloader()) == 300
    with pytest.raises(DataError, match="limit_rows"):
        CTRDataModule(small_synthetic, limit_rows={"dev": 1})


def test_needs_setup(small_synthetic, tmp_path):
    dm = CTRDataModule(small_synthetic, cache_root=str(tmp_path))
    with pytest.raises(RuntimeError, match="ensure_ready"):
        _ = dm.table_sizes
    with pytest.raises(DataError, match="cache not built"):
        dm.setup("fit")


def test_lightning_fit(small_synthetic, synthetic_cache):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self, tables):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(sum(tables), 1, mode="sum")
            self.register_buffer("offsets", torch.tensor(np.cumsum([0, *tables[:-1]])), persistent=False)
            self.dense = torch.nn.Linear(13, 1)
            self.first_rows = []

        def training_step(self, batch, i):
            if i == 0:
                self.first_rows.append(batch.sparse[0].clone())
            logit = self.dense(batch.dense).squeeze(1) + self.emb(batch.sparse + self.offsets).squeeze(1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logit, batch.label)

        def validation_step(self, batch, i):
            self.log("n", float(len(batch)), batch_size=len(batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = CTRDataModule(small_synthetic, cache_root=str(synthetic_cache.parent), batch_size=64)
    model = Tiny(small_synthetic.cardinalities)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.meta.rows["train"] == 20_000
    assert not torch.equal(model.first_rows[0], model.first_rows[1])  # a new order each epoch
