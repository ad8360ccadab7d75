"""Wide & Deep (models/wdl.py and its wdl_*.py parts): its forward is the paper's formula, its cost is read off its
modules, zeroing a group's members removes exactly its positions, the surgery computes what the masked model
computes, R(masks) is `measure` of what extraction builds, and it goes through what every family shares (export,
compressed.pt, batch-norm folding, the family registry)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.groups import PackedGroups, apply_masks_, build_group_sets, kept_from_masks
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.resource import resource_model
from umec_lightning.models import fold_batch_norm, measure
from umec_lightning.models.family import family_named, structure_from_dict
from umec_lightning.models.wdl import WDL, WDLStructure, dense_wdl_structure
from umec_lightning.models.wdl_surgery import wdl_extract, wdl_extracted_structure

ALL = {"feature", "dim", "neuron"}


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(**kw) -> WDLStructure:
    args = dict(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, num_dense=3, deep=[8, 6],
                dense_names=["x", "y", "z"])
    return dense_wdl_structure(**{**args, **kw})


def odd_structure(**kw) -> WDLStructure:
    """Four data features, three read (ids 0, 2, 3) by tables of different widths (one of 0: wide weights only)."""
    deep = kw.pop("deep", [8, 6])
    batch_norm = kw.pop("batch_norm", False)
    args = dict(sparse_names=["a", "b", "c", "d"], feature_ids=[0, 2, 3], table_sizes=[7, 9, 5], table_dims=[4, 3, 6],
                num_dense=3, deep=deep, dense_names=["x", "y", "z"],
                batch_norm=[f"deep.layers.{i}" for i in range(len(deep))] if batch_norm else None,
                dropout={"deep.layers.0": 0.2} if deep else None)
    return WDLStructure(**{**args, **kw})


def trained(s: WDLStructure, seed: int = 0) -> WDL:
    """Biases, batch-norm affine and running statistics off their defaults, so a forgotten slice shows."""
    model = WDL(s, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen))
        for norm in model.batch_norms().values():
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
        model.train()
        for k in range(3):
            dense, sparse = random_inputs(s, batch_size=16, seed=seed + k)
            model(dense * 3 + 1, sparse)
    return model.eval()


def by_hand(model: WDL, dense, sparse):
    """logit = Σ_f w_f[id_f] + wide(dense) + head(deep(cat(dense, e_1 … e_F)))."""
    s = model.structure
    rows = [model.sparse.tables[n].weight[sparse[:, fid]] for fid, n in zip(s.feature_ids, s.feature_names)]
    x = torch.cat(([dense] if s.use_dense else []) + [r[:, :d] for r, d in zip(rows, s.table_dims)], 1)
    h = x
    for linear in model.deep.layers if model.deep is not None else []:
        h = torch.relu(linear(h))
    out = h @ model.head.weight.T + model.head.bias
    if s.use_dense:
        out = out + dense @ model.wide.weight.T + model.wide.bias
    return out.squeeze(1) + sum(r[:, -1] for r in rows)


# ---- the model ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"deep": []}, {"num_dense": 0, "dense_names": []}], ids=["deep", "no-deep",
                                                                                            "no-dense"])
def test_forward_is_wide_plus_deep(kw):
    s = structure(**kw)
    model = trained(s)
    dense, sparse = random_inputs(s, batch_size=6, seed=1)
    assert [t.weight.shape for t in model.sparse.tables.values()] == [(7, 5), (9, 5), (5, 5)]
    assert (model.dense is None) == (model.wide is None) == (not s.use_dense)
    torch.testing.assert_close(model(dense, sparse), by_hand(model, dense, sparse), rtol=0, atol=1e-5)


def test_a_table_of_width_zero_is_its_wide_weights():
    s = odd_structure(table_dims=[4, 0, 6])
    model = trained(s)
    assert s.stored_dims == [5, 1, 7] and s.width == 3 + 10
    dense, sparse = random_inputs(s, batch_size=6, seed=1)
    torch.testing.assert_close(model(dense, sparse), by_hand(model, dense, sparse), rtol=0, atol=1e-5)


@pytest.mark.parametrize("deep", [[8, 6], []])
def test_cost_is_read_off_the_modules(deep):
    s = structure(deep=deep)
    cost = measure(WDL(s, seed=0))
    w = 3 + 3 * 4
    widths = [w, *deep, 1]
    linear_flops = sum(2 * a * b + b for a, b in zip(widths[:-1], widths[1:]))
    linear_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    assert cost.table_params == (7 + 9 + 5) * (4 + 1)
    assert cost.flops == linear_flops + 2 * 3 + 1  # the wide Linear 3 → 1
    assert cost.params == linear_params + 3 + 1 + cost.table_params
    gated = WDL(s, seed=0)
    assert gated.enable_dim_gate().shape == (1 + 3,)
    assert measure(gated).params == cost.params + 1 + 3  # the gate, while compressing


def test_the_family_rebuilds_its_structure_and_checks_its_config():
    s = odd_structure(batch_norm=True)
    assert structure_from_dict(s.to_dict()) == s
    assert family_named("wdl").structure_from_dict(s.to_dict()) == s and s.to_dict()["family"] == "wdl"
    with pytest.raises(ValueError, match="config key `model.deep`"):
        structure(deep=[4, 0])
    with pytest.raises(ValueError, match="needs an input"):
        structure(num_dense=0, dense_names=[], sparse_names=[], table_sizes=[])


def test_batch_norm_folds_into_the_same_eval_function():
    s = structure(batch_norm=True, dropout=0.2)
    model = trained(s)
    served = fold_batch_norm(model)
    assert type(served) is WDL and not served.batch_norms()
    dense, sparse = random_inputs(s, batch_size=64)
    torch.testing.assert_close(served(dense, sparse), model(dense, sparse), rtol=0, atol=1e-5)


def test_exports_equal_the_eager_model_and_compressed_pt_round_trips(tmp_path):
    s = odd_structure(batch_norm=True)
    model = trained(s)
    export_torchscript(model, tmp_path / "m.ts")  # each checks itself against the eager model before writing
    export_onnx(model, tmp_path / "m.onnx")
    small = wdl_extract(model, Kept(use_dense=False, feature_ids=[0, 3], dims={"a": [], "d": [1, 5]},
                                    neurons={"deep.layers.0": [0, 3, 4]}))
    for m in (model, small):
        save_compressed(tmp_path / "c.pt", m, Kept.everything(m))
        back = read_compressed(tmp_path / "c.pt")
        assert type(back.model) is WDL and back.model.structure == m.structure
        dense, sparse = random_inputs(s, batch_size=5)
        assert torch.equal(back.model.eval()(dense, sparse), m(dense, sparse))
        assert back.kept.neurons == {n: list(range(w)) for n, w in zip(m.structure.hidden_names, m.structure.deep)}
    export_torchscript(small, tmp_path / "s.ts")
    export_onnx(small, tmp_path / "s.onnx")


# ---- groups: zeroing a group's members removes its positions --------------------------------------------------


def masked(model: WDL, kept: Kept) -> WDL:
    """The reference: a copy with the removed embedding columns (a removed feature's whole table, wide column too)
    and deep neurons (weight rows, biases, batch-norm γ and β) zeroed; the dense block's removal is the caller's
    (dense · 0, which leaves the wide bias)."""
    out = copy.deepcopy(model)
    s = out.structure
    with torch.no_grad():
        for fid, name, width in zip(s.feature_ids, s.feature_names, s.table_dims):
            table = out.sparse.tables[name].weight
            if fid not in kept.feature_ids:
                table.zero_()
                continue
            keep = set(kept.dims.get(name, range(width)))
            table[:, [j for j in range(width) if j not in keep]] = 0.0
        norms = out.batch_norms()
        for name, rows in kept.neurons.items():
            layer = out.linear_layers()[name]
            removed = [r for r in range(layer.out_features) if r not in set(rows)]
            layer.weight[removed] = 0.0
            layer.bias[removed] = 0.0
            if name in norms:
                norms[name].weight[removed] = 0.0
                norms[name].bias[removed] = 0.0
    return out


def reference_output(model: WDL, kept: Kept, dense, sparse):
    return masked(model, kept)(dense * (1.0 if kept.use_dense else 0.0), sparse)


CASES = [dict(), dict(batch_norm=True), dict(deep=[]), dict(deep=[5], batch_norm=True),
         dict(num_dense=0, use_dense=False, dense_names=None), dict(table_dims=[4, 0, 6])]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_zeroing_the_pruned_groups_is_the_masked_reference_and_extracts_to_it(case):
    s = odd_structure(**CASES[case])
    model = trained(s, seed=case)
    g = torch.Generator().manual_seed(case)
    dense, sparse = random_inputs(s, batch_size=16, seed=case)
    for _ in range(6):
        copy_ = copy.deepcopy(model)
        sets = build_group_sets(copy_, ALL, dim_block=1)
        pruned = random_masks(sets, g)
        try:
            kept = kept_from_masks(copy_, sets, pruned)
        except ValueError:
            continue
        expected = reference_output(model, kept, dense, sparse)
        apply_masks_(copy_, sets, pruned)
        torch.testing.assert_close(copy_(dense, sparse), expected, rtol=0, atol=1e-5)
        small = wdl_extract(model, kept)
        torch.testing.assert_close(small(dense, sparse), expected, rtol=0, atol=1e-5)


def test_group_sets_their_members_and_the_structure_they_leave():
    model = trained(odd_structure())
    s = model.structure
    sets = build_group_sets(model, ALL, dim_block=1)
    assert [gs.name for gs in sets] == ["features", "neurons:deep.layers.0", "neurons:deep.layers.1", "dims:a",
                                        "dims:c", "dims:d"]
    features = sets[0]
    assert features.labels == ["dense", "a", "c", "d"]
    # The feature set made the gate (ones, [dense, a, c, d]). Feature c (x columns 7..9): its gate entry and deep
    # layer 0's columns (never its table); the dense block: its entry, its columns and the wide Linear's weights (not
    # its bias).
    assert model.dim_gate is not None and torch.equal(model.dim_gate.detach(), torch.ones(4))
    assert features.members[0].param is model.dim_gate
    assert not any(m.param is t.weight for m in features.members for t in model.sparse.tables.values())
    norms = features.norms().detach()
    w0 = model.deep.layers[0].weight.detach()
    assert float(norms[2]) == pytest.approx(float(1.0 + w0[:, 7:10].square().sum()), rel=1e-5)
    wide = model.wide.weight.detach()
    assert float(norms[0]) == pytest.approx(float(1.0 + w0[:, :3].square().sum() + wide.square().sum()), rel=1e-5)
    # A dim group is never the wide column: every dim of a pruned, the table keeps its wide weights.
    kept = kept_from_masks(model, sets, {"dims:a": torch.ones(4, dtype=torch.bool),
                                         "features": torch.tensor([True, False, False, False])})
    assert (kept.use_dense, kept.feature_ids, kept.dims["a"]) == (False, [0, 2, 3], [])
    small = wdl_extract(model, kept)
    assert small.structure.table_dims == [0, 3, 6] and small.wide is None
    assert torch.equal(small.sparse.tables["a"].weight, model.sparse.tables["a"].weight[:, 4:])
    assert torch.equal(small.head.bias, model.head.bias + model.wide.bias)
    with pytest.raises(ValueError, match="prune every input"):
        kept_from_masks(model, sets, {"features": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"group kinds \['pair'\] do not exist"):
        build_group_sets(model, {"pair"})
    assert [gs.num_groups for gs in build_group_sets(model, {"dim"})] == [4, 3, 6]
    with pytest.raises(ValueError, match="does not divide"):
        build_group_sets(model, {"dim"}, dim_block=2)  # c is 3 wide
    # Kept.everything rebuilds the same model (its gate of ones folded away)
    same = wdl_extract(model, Kept.everything(model))
    assert same.structure == s and same.dim_gate is None
    assert set(model.state_dict()) - set(same.state_dict()) == {"dim_gate"}
    for key, value in same.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_group_norms_never_touch_a_table():
    """A model whose tables are meta (as under `trainer=torchrec`, or a 10 M-row table never to be scanned) builds
    every group set, reads and zeroes their norms; zeroing a feature's group zeroes its gate entry, not its table."""
    s = odd_structure(batch_norm=True)
    full = trained(s)
    bare = WDL(s, hold_tables=False)
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if k not in full.table_keys()}
                         | bare.table_placeholders(), assign=True)
    sets = build_group_sets(bare, ALL, dim_block=1)
    assert not bare.holds_tables and bare.dim_gate is not None and not bare.dim_gate.is_meta
    packed = PackedGroups(sets)
    norms = packed.norms()
    assert not norms.is_meta
    for gs in sets:
        assert not any(m.param.is_meta for m in gs.members), gs.name
        assert bool(torch.isfinite(gs.norms()).all()), gs.name
    # The same norms as the model that holds its tables: no table is a member.
    assert torch.equal(PackedGroups(build_group_sets(full, ALL, dim_block=1)).norms(), norms)
    sets[0].zero_(torch.tensor([False, True, False, False]))
    assert bare.dim_gate.tolist() == [1.0, 0.0, 1.0, 1.0]
    before = full.sparse.tables["a"].weight.detach().clone()
    (features,) = build_group_sets(full, {"feature"})
    features.zero_(torch.tensor([False, True, False, False]))
    assert torch.equal(full.sparse.tables["a"].weight, before)  # the gate carries the removal, not the table
    # A gradient through the model reaches the gate: a Taylor score or a group-lasso gradient sees every member.
    model = trained(s)
    (features,) = build_group_sets(model, {"feature"})
    dense, sparse = random_inputs(s, batch_size=8)
    model(dense, sparse).sum().backward()
    assert model.dim_gate.grad is not None and bool((model.dim_gate.grad != 0).all())


@pytest.mark.parametrize("kw", [{}, {"deep": []}, {"num_dense": 0, "use_dense": False, "dense_names": None},
                                {"table_dims": [4, 0, 6]}], ids=["deep", "no-deep", "no-dense", "zero-width"])
def test_zeroing_a_gate_entry_removes_its_input_exactly(kw):
    s = odd_structure(**kw)
    model = trained(s)
    ud = int(s.use_dense)
    dense, sparse = random_inputs(s, batch_size=16, seed=3)
    everything = Kept.everything(model)
    for p, fid in enumerate(s.feature_ids):  # feature f: its embedding and its wide weight
        gated = copy.deepcopy(model)
        with torch.no_grad():
            gated.enable_dim_gate()[ud + p] = 0.0
        kept = Kept(**{**everything.to_dict(), "pairs": None,
                       "feature_ids": [f for f in s.feature_ids if f != fid]})
        expected = reference_output(model, kept, dense, sparse)
        torch.testing.assert_close(gated(dense, sparse), expected, rtol=0, atol=1e-5)
        assert not torch.allclose(model(dense, sparse), expected, atol=1e-4)  # the wide weight alone would show
    if ud:  # the dense block: the deep input and the wide Linear (its bias stays)
        gated = copy.deepcopy(model)
        with torch.no_grad():
            gated.enable_dim_gate()[0] = 0.0
        kept = Kept(**{**everything.to_dict(), "pairs": None, "use_dense": False})
        torch.testing.assert_close(gated(dense, sparse), reference_output(model, kept, dense, sparse), rtol=0,
                                   atol=1e-5)
    # A gate of ones is the model without one.
    ones = copy.deepcopy(model)
    ones.enable_dim_gate()
    torch.testing.assert_close(ones(dense, sparse), model(dense, sparse), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_extract_equals_the_gated_model_under_any_gate(case):
    """A gate as compression leaves it (values off 1, some zeros): extraction folds it and computes what the gated,
    masked model computes."""
    s = odd_structure(**CASES[case])
    model = trained(s, seed=case)
    ud = int(s.use_dense)
    g = torch.Generator().manual_seed(10 + case)
    dense, sparse = random_inputs(s, batch_size=16, seed=case)
    checked = 0
    for trial in range(6):
        gated = copy.deepcopy(model)
        sets = build_group_sets(gated, ALL, dim_block=1)
        with torch.no_grad():
            gate = gated.dim_gate
            gate.copy_(torch.rand(gate.shape, generator=g) * 1.5 - 0.25)
            gate[ud + trial % s.num_features] = 0.0
        try:
            kept = kept_from_masks(gated, sets, random_masks(sets, g))
        except ValueError:
            continue
        small = wdl_extract(gated, kept)
        assert small.dim_gate is None and measure(small) == measure(WDL(small.structure))
        torch.testing.assert_close(small(dense, sparse), reference_output(gated, kept, dense, sparse), rtol=0,
                                   atol=1e-5)
        everything = wdl_extract(gated, Kept.everything(gated))
        assert everything.dim_gate is None
        torch.testing.assert_close(everything(dense, sparse), gated(dense, sparse), rtol=0, atol=1e-5)
        checked += 1
    assert checked >= 3
    if s.batch_norm is not None:  # the shared code refuses a model in the middle of compression
        with pytest.raises(ValueError, match="dim gate"):
            fold_batch_norm(gated)


def test_the_bad_kept_is_refused():
    model = trained(odd_structure())
    everything = Kept.everything(model)

    def kept(**kw) -> Kept:
        return Kept(**{**everything.to_dict(), "pairs": None, **kw})

    refused = [
        (kept(ranks={"head": 1}), "cannot factorise"),
        (kept(feature_ids=[0, 1]), "feature ids"),
        (kept(dims={"zz": [0]}), "tables the model does not have"),
        (kept(neurons={"head": [0]}), "logit layer"),
        (kept(neurons={"deep.layers.5": [0]}), "cannot be pruned"),
        (kept(neurons={"deep.layers.0": []}), "keeps no neuron"),
        (kept(neurons={"deep.layers.0": [8]}), "must lie in"),
        (kept(use_dense=False, feature_ids=[]), "no input"),
    ]
    for bad, message in refused:
        for fn in (wdl_extract, wdl_extracted_structure):
            with pytest.raises(ValueError, match=message):
                fn(model, bad)
    with pytest.raises(ValueError, match="bases"):
        wdl_extract(model, everything, bases={"a": object()})


def test_meta_tables_extract_to_meta_tables_of_the_new_shapes():
    s = odd_structure(batch_norm=True)
    full = trained(s)
    bare = WDL(s, hold_tables=False)
    bare.load_state_dict({k: v for k, v in full.state_dict().items() if k not in full.table_keys()}
                         | bare.table_placeholders(), assign=True)
    bare.eval()
    kept = Kept(use_dense=True, feature_ids=[2, 3], dims={"c": [0, 2], "d": []}, neurons={"deep.layers.1": [0, 4]})
    theirs, ours = wdl_extract(bare, kept), wdl_extract(full, kept)
    assert not theirs.holds_tables and ours.holds_tables and theirs.structure == ours.structure
    assert [t.weight.shape for t in theirs.sparse.tables.values()] == [(9, 3), (5, 1)]
    assert measure(theirs) == measure(ours)


# ---- the resource model -----------------------------------------------------------------------------------


def random_masks(sets, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Each set pruned at random, down to one group; a dim set now and then pruned whole."""
    masks = {}
    p = float(torch.rand(1, generator=g)) * 0.8
    for gs in sets:
        mask = torch.rand(gs.num_groups, generator=g) < p
        if mask.all() and not (gs.kind == "dim" and float(torch.rand(1, generator=g)) < 0.5):
            mask[int(torch.randint(gs.num_groups, (1,), generator=g))] = False
        masks[gs.name] = mask
    return masks


RESOURCE_CASES = [dict(), dict(deep=[]), dict(num_dense=0, use_dense=False, dense_names=None),
                  dict(table_dims=[4, 0, 6]), dict(deep=[5], batch_norm=True)]


@pytest.mark.parametrize("case", range(len(RESOURCE_CASES)))
@pytest.mark.parametrize("kinds", [ALL, {"feature"}, {"dim", "neuron"}, {"feature", "dim"}], ids=str)
@pytest.mark.parametrize("block", [1, 2])
def test_resource_of_random_masks_is_measure_of_the_extracted_model(case, kinds, block):
    s = odd_structure(**{"table_dims": [4, 2, 6], **RESOURCE_CASES[case]})
    model = WDL(s, seed=0)
    dense = measure(model)  # before the sets add the gate, which extraction folds away and R does not count
    sets = build_group_sets(model, kinds, dim_block=block)
    if not sets:
        pytest.skip("no set of these kinds")
    resource = resource_model(model, sets)
    assert resource.dense == dict(zip(("flops", "params"), (dense.flops, dense.params)))
    assert (model.dim_gate is not None) == ("feature" in kinds)
    g = torch.Generator().manual_seed(block)
    checked = 0
    for _ in range(25):
        masks = random_masks(sets, g)
        try:
            kept = kept_from_masks(model, sets, masks)
        except ValueError:
            continue
        cost = measure(wdl_extract(model, kept))
        assert resource.of_masks(masks) == {"flops": cost.flops, "params": cost.params}, masks
        checked += 1
    assert checked >= 15


def test_bottom_k_numpy_torch_variants_and_minimum():
    s = odd_structure(table_dims=[4, 2, 6])
    model = WDL(s, seed=0)
    dense = measure(model)
    sets = build_group_sets(model, ALL, dim_block=2)
    resource = resource_model(model, sets)
    g = torch.Generator().manual_seed(0)
    sizes = torch.tensor([gs.num_groups for gs in sets])
    ranks = torch.stack([torch.cat([torch.randperm(int(n), generator=g), torch.arange(int(n), resource.max_groups)])
                         for n in sizes])
    k = (torch.rand(20, len(sets), generator=g) * sizes).long()
    valid = torch.arange(resource.max_groups)[None, :] < sizes[:, None]
    expected = torch.stack(resource.evaluate((ranks[None] < k[:, :, None]) & valid))
    assert torch.equal(resource.evaluate_bottom_k(ranks, k), expected)
    assert np.array_equal(resource.evaluate_bottom_k(ranks.numpy(), k.numpy()), expected.numpy())
    # minimum: one input left (the dense block or one table with one dim block), one neuron per deep layer
    smallest = [Kept(use_dense=True, feature_ids=[], dims={}, neurons={"deep.layers.0": [0], "deep.layers.1": [0]})]
    smallest += [Kept(use_dense=False, feature_ids=[fid], dims={name: [0, 1]},
                      neurons={"deep.layers.0": [0], "deep.layers.1": [0]})
                 for fid, name in zip(s.feature_ids, s.feature_names)]
    costs = [measure(wdl_extract(model, kept)) for kept in smallest]
    low = resource.minimum()
    assert low["flops"] == pytest.approx(min(c.flops for c in costs) / dense.flops, rel=1e-12)
    assert low["params"] == pytest.approx(min(c.params for c in costs) / dense.params, rel=1e-12)


def test_a_compressed_model_round_trips_and_exports(tmp_path):
    s = odd_structure(batch_norm=True)
    model = trained(s)
    kept = Kept(use_dense=True, feature_ids=[0, 3], dims={"a": [0, 2], "d": [5]},
                neurons={"deep.layers.0": [1, 2, 7], "deep.layers.1": [0]})
    small = wdl_extract(model, kept)
    save_compressed(tmp_path / "c.pt", small, kept)
    back = read_compressed(tmp_path / "c.pt")
    dense, sparse = random_inputs(s, batch_size=7)
    assert back.model.structure == small.structure and back.kept == kept
    assert torch.equal(back.model.eval()(dense, sparse), small(dense, sparse))
    assert measure(back.model) == measure(WDL(wdl_extracted_structure(model, kept)))


@pytest.mark.parametrize("override, key", [("model.deep=[400,0]", "model.deep"),
                                           ("model.embedding_dim=0", "model.embedding_dim"),
                                           ("+model.cross_layers=2", "model`: unknown keys")])
def test_a_bad_wdl_config_is_one_line_naming_the_key(override, key):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from umec_lightning.config import ConfigError, validate_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        good = compose("config", overrides=["model=wdl", "mode=dense"])
        bad = compose("config", overrides=["model=wdl", "mode=dense", override])
    validate_config(good)
    with pytest.raises(ConfigError, match=f"`{key}") as err:
        validate_config(bad)
    assert "\n" not in str(err.value)
