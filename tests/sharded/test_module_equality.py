"""The real CTRModule under TorchrecStrategy, in two gloo processes, against one process training the same
DLRM with plain SGD on the two ranks' batches together (what DDP-style averaging makes of a step): equal
outputs at every step and equal weights (tables included) at the end.

Three models: the dense `dot` one, a compressed-looking `cat` one (tables narrowed to widths fbgemm cannot
shard as they are, 3, 5, 2, 6: stored padded, `ebc.padded_width`; one table projected from rank 2 to 4; one
factored Linear), as extraction hands the next stage, and a DCNv2 and a DeepFM (other model families,
`models.family`)."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from umec_lightning.data.core import Batch  # noqa: E402
from umec_lightning.models import dense_structure  # noqa: E402
from umec_lightning.models.dcnv2 import dense_dcnv2_structure  # noqa: E402
from umec_lightning.models.deepfm import dense_deepfm_structure  # noqa: E402
from umec_lightning.models.family import family_of_structure  # noqa: E402
from umec_lightning.models.wdl import dense_wdl_structure  # noqa: E402
from umec_lightning.module import CTRModule  # noqa: E402
from umec_lightning.sharded.checkpoint import assemble  # noqa: E402

WORLD, STEPS, BATCH, LR = 2, 4, 16, 0.5
SIZES = [7, 12, 5, 30, 9]  # odd sizes: row-wise shards of unequal length


def _structure(kind: str = "dot"):
    if kind == "deepfm":  # tables D + 1 wide (the first-order column), stored padded to a multiple of 4
        return dense_deepfm_structure(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=SIZES,
                                      embedding_dim=4, num_dense=3, deep=[8], dense_names=["I1", "I2", "I3"])
    if kind == "wdl":  # tables D + 1 wide (the wide weight's column), as DeepFM's
        return dense_wdl_structure(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=SIZES,
                                   embedding_dim=4, num_dense=3, deep=[8], dense_names=["I1", "I2", "I3"])
    if kind == "dcnv2":  # the dense block un-normed: a batch norm's statistics are per rank (as under DDP without
        # sync_batchnorm, which needs CUDA), so 2 ranks of half a batch cannot equal one process of the whole
        return dense_dcnv2_structure(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=SIZES,
                                     embedding_dim=4, num_dense=3, deep=[8], cross_layers=2, cross_rank=None,
                                     experts=1, stacking="parallel", dense_names=["I1", "I2", "I3"],
                                     dense_norm="none")
    s = dense_structure(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=SIZES, embedding_dim=4,
                        bottom=[8, 4], top=[8, 1], num_dense=3, dense_names=["I1", "I2", "I3"],
                        interaction="dot" if kind == "dot" else "cat")
    if kind == "narrow_cat":
        s = dataclasses.replace(s, table_dims=[3, 5, 2, 4, 6], table_ranks=[3, 5, 2, 2, 6],
                                layer_ranks={"over.layers.0": 3})
    return s


def _model(kind: str, **kwargs):
    """The model of `kind`, built by its family."""
    s = _structure(kind)
    return family_of_structure(s.to_dict()).build(s, **kwargs)


def _batches(rank: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        sparse = torch.stack([torch.randint(0, n, (BATCH,), generator=gen) for n in SIZES], dim=1)
        out.append(Batch(dense=torch.rand(BATCH, 3, generator=gen), sparse=sparse,
                         label=torch.randint(0, 2, (BATCH,), generator=gen).float()))
    return out


class RecordOutputs(pl.Callback):
    """The sharded model's logits on each training batch, before its step (every rank runs it: a collective)."""

    def __init__(self):
        self.logits = []
        self.pieces = self.shapes = self.shards = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        assert pl_module.sharded is not None and pl_module.step_model is pl_module.sharded
        with torch.no_grad():
            self.logits.append(pl_module.step_model(batch.dense, batch.sparse).detach().clone())

    def on_train_end(self, trainer, pl_module):
        """While the shards still live (before the strategy gathers them): what a checkpoint would hold of
        this rank's tables, and how many shards each table has."""
        from umec_lightning.sharded.tables import local_pieces

        self.pieces, self.shapes = local_pieces(pl_module.sharded)
        self.shards = {name: len(p.sharding_spec.shards) if hasattr(p.sharding_spec, "shards") else 1
                       for tables in pl_module.sharded.plan.plan.values() for name, p in tables.items()}


OPTIMIZERS = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}


def _worker(rank: int, port: int, sharding, kind: str, optimizer: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    from umec_lightning.sharded import tables
    from umec_lightning.sharded.strategy import TorchrecStrategy

    # Tables move between rank 0 and the shards in blocks of 1 to 3 rows: blocks that cut row-wise shards.
    tables.CHUNK_BYTES = 48

    # As a run builds it: rank 1 without tables (meta), except in the table_wise case, where it builds them
    # and the strategy frees them at setup.
    hold = rank == 0 or sharding == "table_wise"
    module = CTRModule(_model(kind, seed=0, hold_tables=hold), lr=LR, phase="t", auroc_bins=None,
                       log_every_n_steps=1, optimizer=OPTIMIZERS[optimizer])
    record = RecordOutputs()
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=TorchrecStrategy(sharding=sharding),
                         max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[record], use_distributed_sampler=False)
    trainer.fit(module, train_dataloaders=DataLoader(_batches(rank), batch_size=None))
    assert module.sharded is None and type(module.model) is type(_model(kind))  # the plain model is back, trained
    assert module.model.holds_tables == (rank == 0)  # rank 0 alone holds the tables of record
    state = {k: v for k, v in module.model.state_dict().items() if not v.is_meta}
    torch.save({"logits": record.logits, "state": state, "pieces": record.pieces,
                "shapes": record.shapes, "shards": record.shards}, os.path.join(out_dir, f"rank{rank}.pt"))


def _reference(kind: str, optimizer: str):
    """One process, one step per step on both ranks' batches together (mean loss over 2·BATCH); the tables
    get sparse gradients (torch's sparse SGD / Adagrad)."""
    model = _model(kind, seed=0)
    opt = OPTIMIZERS[optimizer](model.parameters(), lr=LR)
    ranks = [_batches(r) for r in range(WORLD)]
    logits = [[] for _ in range(WORLD)]
    for step in range(STEPS):
        parts = [ranks[r][step] for r in range(WORLD)]
        out = model(torch.cat([b.dense for b in parts]), torch.cat([b.sparse for b in parts]))
        for r, chunk in enumerate(out.detach().split(BATCH)):
            logits[r].append(chunk)
        loss = F.binary_cross_entropy_with_logits(out, torch.cat([b.label for b in parts]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits, model.state_dict()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sharding, kind, optimizer", [
    # table-wise, row-wise and `mixed` are slow: the `adagrad` case shards a dot model's tables every way (table-,
    # row-, column-wise and data-parallel) in one run, and `dcnv2` the same mix as `mixed` under SGD
    pytest.param("table_wise", "dot", "sgd", marks=pytest.mark.slow),
    pytest.param("row_wise", "dot", "sgd", marks=pytest.mark.slow),
    pytest.param({"default": "table_wise", "C2": "row_wise", "C4": "data_parallel"}, "dot", "sgd",
                 marks=pytest.mark.slow),
    ({"default": "row_wise", "C1": "table_wise", "C2": "column_wise", "C5": "data_parallel"}, "narrow_cat", "sgd"),
    ({"default": "table_wise", "C2": "row_wise", "C3": "column_wise", "C4": "data_parallel"}, "dot", "adagrad"),
    ({"default": "table_wise", "C2": "row_wise", "C4": "data_parallel"}, "dcnv2", "sgd"),
    pytest.param({"default": "table_wise", "C2": "row_wise", "C3": "column_wise", "C4": "data_parallel"}, "deepfm",
                 "sgd", marks=pytest.mark.slow),
    pytest.param({"default": "row_wise", "C1": "table_wise", "C3": "column_wise", "C5": "data_parallel"}, "wdl",
                 "adagrad", marks=pytest.mark.slow)],
    ids=["table_wise", "row_wise", "mixed", "narrow_cat", "adagrad", "dcnv2", "deepfm", "wdl"])
def test_sharded_module_trains_like_one_process(tmp_path, sharding, kind, optimizer):
    mp.spawn(_worker, args=(_free_port(), sharding, kind, optimizer, str(tmp_path)), nprocs=WORLD)
    logits, state = _reference(kind, optimizer)
    initial = _model(kind, seed=0).state_dict()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert len(got["logits"]) == STEPS
        for step in range(STEPS):
            torch.testing.assert_close(got["logits"][step], logits[r][step], rtol=0, atol=1e-5)
        tables = set(_model(kind).table_keys())
        assert set(got["state"]) == (set(state) if r == 0 else set(state) - tables)
        for key, value in state.items():
            if key not in got["state"]:
                continue
            torch.testing.assert_close(got["state"][key], value, rtol=0, atol=1e-5, msg=key)
            # Every table and layer moved: the comparison is not of untrained weights.
            assert not torch.equal(value, initial[key]), key
    # The checkpoint pieces of both ranks (padding cut off) assemble into the trained tables.
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    tables = assemble(ranks[0]["shapes"], [got["pieces"] for got in ranks])
    model = _model(kind)
    model.load_state_dict(state)
    for name, table in tables.items():
        torch.testing.assert_close(table, model.sparse.tables[name].weight.detach(), rtol=0, atol=1e-5)
    if kind == "narrow_cat":  # column-wise really cuts: C2 (5 columns, stored 8) in blocks of 4 on 2 ranks
        assert ranks[0]["shards"]["C2"] == 2
