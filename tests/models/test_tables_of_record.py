"""A DLRM without its tables (meta: what every rank but 0 builds under trainer=torchrec) and the readers that
load into one: same dense weights as the model with tables, nothing table-sized read or allocated, and
sharded checkpoints assembled straight into a model's own tables. Plain torch: no torchrec needed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression import Kept
from umec_lightning.models import DLRM, dense_structure
from umec_lightning.sharded.checkpoint import (
    SHARDED_KEY,
    assemble,
    read_checkpoint,
    read_checkpoint_into,
    shard_path,
)

SIZES = [7, 12, 5, 30]


def _structure(**changes):
    s = dense_structure(sparse_names=[f"C{i + 1}" for i in range(len(SIZES))], table_sizes=SIZES,
                        embedding_dim=4, bottom=[8, 4], top=[8, 1], num_dense=3, dense_names=["I1", "I2", "I3"])
    return dataclasses.replace(s, **changes)


def test_a_model_without_tables_has_the_same_dense_weights_and_no_table_memory():
    # A projected table too (its projection is a dense weight, drawn before the tables).
    s = _structure(table_ranks=[4, 2, 4, 4])
    full, bare = DLRM(s, seed=3), DLRM(s, seed=3, hold_tables=False)
    assert full.holds_tables and not bare.holds_tables
    tables = set(full.table_keys())
    ours, theirs = full.state_dict(), bare.state_dict()
    assert set(ours) == set(theirs) and tables
    for key in ours:
        if key in tables:
            assert theirs[key].is_meta and theirs[key].shape == ours[key].shape
        else:
            assert torch.equal(ours[key], theirs[key]), key
    assert bare.sparse.tables["C4"].weight.is_meta and bare.sparse.tables["C4"].weight.shape == (30, 4)
    assert bare.enable_dim_gate().device.type == "cpu"  # the gate is a real parameter even so
    full.release_tables()
    assert not full.holds_tables and all(full.state_dict()[k].is_meta for k in tables)


def _sharded_checkpoint(tmp_path, model: DLRM, rows_cut: int) -> str:
    """A checkpoint as two ranks write it: tables row-wise cut at `rows_cut`, dense weights in the main file."""
    path = tmp_path / "epoch-end.ckpt"
    tables = {name: view.weight.detach().clone() for name, view in model.sparse.tables.items()}
    pieces = [{name: [([0, 0], t[:rows_cut])] for name, t in tables.items()},
              {name: [([rows_cut, 0], t[rows_cut:])] for name, t in tables.items()}]
    for r, part in enumerate(pieces):
        torch.save(part, shard_path(path, r, 2))
    dense = {f"model.{k}": v for k, v in model.state_dict().items() if k not in model.table_keys()}
    torch.save({"state_dict": dense, SHARDED_KEY: {"world_size": 2, "optimizer_shapes": {},
                                                   "shapes": {n: list(t.shape) for n, t in tables.items()}}}, path)
    return str(path)


def test_a_sharded_checkpoint_is_assembled_into_the_models_own_tables(tmp_path):
    trained = DLRM(_structure(), seed=1)
    path = _sharded_checkpoint(tmp_path, trained, rows_cut=3)
    target = DLRM(_structure(), seed=2)
    storage = target.sparse.groups[0].weight.data_ptr()
    module = torch.nn.Module()
    module.model = target
    module.load_state_dict(read_checkpoint_into(target, path)["state_dict"])
    for key, value in trained.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    assert target.sparse.groups[0].weight.data_ptr() == storage  # written in place, not replaced
    # A model without tables reads none and loads the rest.
    bare = DLRM(_structure(), seed=2, hold_tables=False)
    holder = torch.nn.Module()
    holder.model = bare
    holder.load_state_dict(read_checkpoint_into(bare, path)["state_dict"])
    assert not bare.holds_tables
    assert torch.equal(bare.over.layers[0].weight, trained.over.layers[0].weight)
    assert not any(k.startswith("model.sparse.") for k in read_checkpoint(path, tables=False)["state_dict"])


def test_assembly_refuses_a_gap_a_stray_piece_and_a_wrong_shape(tmp_path):
    whole = torch.arange(12.0).reshape(6, 2)
    shapes = {"C1": [6, 2]}
    assert torch.equal(assemble(shapes, [{"C1": [([0, 0], whole[:4])]}, {"C1": [([4, 0], whole[4:])]}])["C1"],
                       whole)
    with pytest.raises(ValueError, match="do not cover"):
        assemble(shapes, [{"C1": [([0, 0], whole[:4])]}])
    with pytest.raises(ValueError, match="outside the table"):
        assemble(shapes, [{"C1": [([0, 0], whole[:4]), ([4, 0], whole)]}])
    with pytest.raises(ValueError, match=r"shape \[6, 2\], to be read into \[5, 2\]"):
        assemble(shapes, [], into={"C1": torch.empty(5, 2)})


def test_a_compressed_model_reads_without_its_tables(tmp_path):
    model = DLRM(_structure(table_ranks=[4, 2, 4, 4]), seed=0)
    path = save_compressed(tmp_path / "compressed.pt", model, Kept.everything(model))
    bare = read_compressed(path, hold_tables=False).model
    assert not bare.holds_tables
    for key, value in model.state_dict().items():
        got = bare.state_dict()[key]
        assert got.is_meta if key in model.table_keys() else torch.equal(got, value), key
