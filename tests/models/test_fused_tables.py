"""Tables of one stored width share one weight (`TableGroup`): same numbers as one nn.Embedding per table."""

import copy

import pytest
import torch
from torch import nn

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import random_inputs
from umec_lightning.compression.extract import extract
from umec_lightning.compression.kept import Kept
from umec_lightning.distributed import sparse_tables
from umec_lightning.models import DLRM, DLRMStructure, dense_structure
from umec_lightning.models.dlrm import SparseArch

# Features C3, C5, C1, C4, C2 (the data's columns 2, 4, 0, 3, 1) of widths 3, 2, 3, 1, 2: three groups.
MIXED = DLRMStructure(sparse_names=["C1", "C2", "C3", "C4", "C5"], feature_ids=[2, 4, 0, 3, 1],
                      table_sizes=[6, 9, 4, 7, 5], table_dims=[3, 2, 3, 1, 2], num_dense=2, bottom=[3],
                      top=[4, 1], interaction="cat")


def per_table(arch: SparseArch) -> tuple[list[nn.Embedding], nn.ModuleDict]:
    """The same model as one nn.Embedding per table (copies of the weights) and its projections."""
    tables = []
    for table in arch.tables.values():
        emb = nn.Embedding(table.num_embeddings, table.embedding_dim, sparse=table.sparse)
        with torch.no_grad():
            emb.weight.copy_(table.weight)
        tables.append(emb)
    return tables, copy.deepcopy(arch.projections)


def per_table_forward(tables, projections, structure, sparse):
    out = [emb(sparse[:, fid]) for emb, fid in zip(tables, structure.feature_ids)]
    for projection in projections.values():
        out[projection.position] = projection(out[projection.position])
    return out


def batch(structure, size=16, seed=0):
    """Ids with repeats (a table's row read several times in one batch: its gradient rows add up)."""
    gen = torch.Generator().manual_seed(seed)
    sparse = torch.zeros(size, len(structure.sparse_names), dtype=torch.long)
    for fid, rows in zip(structure.feature_ids, structure.table_sizes):
        sparse[:, fid] = torch.randint(0, min(rows, 3), (size,), generator=gen)
    return sparse


def projected():
    s = dense_structure(sparse_names=["C1", "C2", "C3"], table_sizes=[5, 7, 3], embedding_dim=4, bottom=[8, 4],
                        top=[6, 1], num_dense=3)
    s.table_ranks = [2, 4, 1]
    s.validate()
    return s


@pytest.mark.parametrize("structure", [MIXED, projected()], ids=["mixed_widths", "projected"])
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad])
def test_outputs_and_updates_equal_one_embedding_per_table(structure, optimizer):
    arch = SparseArch(structure)
    arch.reset_parameters(torch.Generator().manual_seed(0))
    assert len(arch.groups) == len(set(structure.stored_dims))
    tables, projections = per_table(arch)
    before = [t.weight.detach().clone() for t in arch.tables.values()]
    sparse = batch(structure)
    out = arch(sparse)
    expected = per_table_forward(tables, projections, structure, sparse)
    assert [o.shape for o in out] == [e.shape for e in expected]
    for got, want in zip(out, expected):
        assert torch.equal(got, want)

    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen) for o in out]  # a loss that weighs every output entry
    sum((o * w).sum() for o, w in zip(out, weights)).backward()
    sum((e * w).sum() for e, w in zip(expected, weights)).backward()
    assert all(g.weight.grad.is_sparse for g in arch.groups)
    optimizer(arch.parameters(), lr=0.1).step()
    optimizer([*(t.weight for t in tables), *projections.parameters()], lr=0.1).step()
    for table, emb, old in zip(arch.tables.values(), tables, before):
        assert not torch.equal(table.weight, old)
        torch.testing.assert_close(table.weight, emb.weight, atol=1e-6, rtol=0)


def test_table_views_read_and_write_the_fused_weight():
    m = DLRM(MIXED, seed=0)
    assert list(m.sparse.tables) == MIXED.feature_names
    assert [t.embedding_dim for t in m.sparse.tables.values()] == MIXED.table_dims
    assert [t.num_embeddings for t in m.sparse.tables.values()] == MIXED.table_sizes
    assert [k for k in m.state_dict() if k.startswith("sparse.")] == [f"sparse.groups.{g}.weight" for g in range(3)]
    with torch.no_grad():
        m.sparse.tables["C2"].weight.fill_(0.5)  # in place, as masking and prox do
    sparse = batch(MIXED)
    k = MIXED.feature_names.index("C2")
    assert torch.equal(m.sparse(sparse)[k], torch.full((16, MIXED.table_dims[k]), 0.5))
    # The sparse-gradient tables found by type are the fused weights, once each.
    assert sorted(sparse_tables(m)) == [f"sparse.groups.{g}.weight" for g in range(3)]


def test_the_grad_of_a_table_is_its_rows_of_the_fused_gradient():
    m = DLRM(MIXED, seed=0)
    sparse = batch(MIXED)
    m(torch.randn(16, 2), sparse).sum().backward()
    for name, fid in zip(MIXED.feature_names, MIXED.feature_ids):
        grad = m.sparse.tables[name].grad
        assert grad.is_sparse and grad.shape == m.sparse.tables[name].weight.shape
        assert set(grad.coalesce().indices()[0].tolist()) == set(sparse[:, fid].tolist())


def per_table_state(model) -> dict:
    """`model`'s state dict as written before the tables were fused: one `sparse.tables.<name>.weight` each."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("sparse.groups.")}
    state.update({f"sparse.tables.{name}.weight": t.weight.detach().clone()
                  for name, t in model.sparse.tables.items()})
    return state


def test_an_old_per_table_state_dict_loads():
    model = DLRM(MIXED, seed=0)
    fresh = DLRM(MIXED, seed=1)
    fresh.load_state_dict(per_table_state(model), strict=True)
    dense, sparse = torch.randn(16, 2), batch(MIXED)
    assert torch.equal(fresh(dense, sparse), model(dense, sparse))
    # Under a prefix too (a Lightning checkpoint's `model.`).
    wrapped = nn.ModuleDict({"model": DLRM(MIXED, seed=2)})
    wrapped.load_state_dict({f"model.{k}": v for k, v in per_table_state(model).items()}, strict=True)
    assert torch.equal(wrapped["model"](dense, sparse), model(dense, sparse))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_tables_of_different_widths_through_extract_and_a_compressed_file(tmp_path, interaction):
    names = ["C1", "C2", "C3", "C4"]
    structure = dense_structure(sparse_names=names, table_sizes=[10, 20, 30, 40], embedding_dim=4,
                                bottom=[8, 4], top=[8, 1], num_dense=3, interaction=interaction)
    model = DLRM(structure, seed=0)
    kept = Kept.everything(model)
    if interaction == "dot":  # low-rank tables: stored at rank 2 and 1, projected back to 4
        kept.ranks = {"C2": 2, "C4": 1}
    else:  # embedding-dim reduction: each table keeps its own columns
        kept.dims = {"C1": [0, 1, 2, 3], "C2": [1], "C3": [0, 3], "C4": [0, 1, 3]}
    small = extract(model, kept)
    widths = [t.embedding_dim for t in small.sparse.tables.values()]
    assert len(set(widths)) == len(small.sparse.groups) > 1
    dense, sparse = random_inputs(structure, 16)
    out = small.sparse(sparse)
    for k, (table, fid) in enumerate(zip(small.sparse.tables.values(), small.structure.feature_ids)):
        looked_up = table.weight[sparse[:, fid]]
        name = small.structure.feature_names[k]
        if name in small.sparse.projections:
            looked_up = small.sparse.projections[name](looked_up)
        torch.testing.assert_close(out[k], looked_up)

    path = save_compressed(tmp_path / "compressed.pt", small, kept)
    stored = read_compressed(path)
    assert stored.model.state_dict().keys() == small.state_dict().keys()
    assert torch.equal(stored.model(dense, sparse), small(dense, sparse))
    # A file written before the tables were fused holds one weight per table: it loads the same.
    payload = torch.load(path, weights_only=True)
    payload["state_dict"] = per_table_state(small)
    torch.save(payload, tmp_path / "old.pt")
    assert torch.equal(read_compressed(tmp_path / "old.pt").model(dense, sparse), small(dense, sparse))


def test_a_model_without_tables():
    s = DLRMStructure(sparse_names=["a"], feature_ids=[], table_sizes=[], table_dims=[], num_dense=2, bottom=[3],
                      top=[1], interaction="cat")
    m = DLRM(s, seed=0)
    assert len(m.sparse.groups) == 0 and m.sparse.tables == {}
    dense, sparse = torch.randn(4, 2), torch.zeros(4, 1, dtype=torch.long)
    assert m.sparse(sparse) == []
    assert torch.equal(torch.jit.script(m)(dense, sparse), m(dense, sparse))
