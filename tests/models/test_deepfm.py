"""DeepFM (models/deepfm.py and its deepfm_*.py parts): the forward is the paper's formula, the cost is read off the
modules by the stated convention, zeroing the pruned groups removes exactly what the masks say, the extracted model
equals the masked one (under any compression gate), R equals `measure` of the extraction, and the model goes
through what every family shares (compressed.pt, batch-norm folding, TorchScript and ONNX, the config check)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.extract import extract
from umec_lightning.compression.groups import apply_masks_, build_group_sets, kept_from_masks
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.resource import resource_model
from umec_lightning.models import fold_batch_norm, measure
from umec_lightning.models.deepfm import DeepFM, DeepFMStructure, dense_deepfm_structure
from umec_lightning.models.family import family_named, structure_from_dict

D = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def structure(**kw) -> DeepFMStructure:
    args = dict(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=D, num_dense=3, deep=[8, 6],
                dense_names=["x", "y", "z"])
    return dense_deepfm_structure(**{**args, **kw})


def model_of(seed: int = 0, **kw) -> DeepFM:
    """A model with biases, batch-norm affine and running statistics off their defaults (a forgotten slice shows)."""
    model = DeepFM(structure(**kw), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "norms" in name else 0.0))
        if model.batch_norms():
            model.train()
            for k in range(3):
                dense, sparse = random_inputs(model.structure, batch_size=16, seed=seed + k)
                model(dense * 3 + 1, sparse)
    return model.eval()


def inputs(s, batch: int = 12, seed: int = 1):
    return random_inputs(s, batch_size=batch, seed=seed)


# ---- the model --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"num_dense": 0, "dense_names": []}, {"deep": []}],
                         ids=["dense", "no-dense", "no-deep"])
def test_forward_is_first_order_plus_fm_plus_deep(kw):
    model = model_of(**kw)
    s = model.structure
    dense, sparse = inputs(s)
    rows = [model.sparse.tables[n].weight[sparse[:, fid]] for fid, n in zip(s.feature_ids, s.feature_names)]
    e = [r[:, :D] for r in rows]
    first = sum(r[:, D] for r in rows)
    if s.use_dense:
        first = first + dense @ model.first_order.weight[0] + model.first_order.bias[0]
    fm = torch.zeros(dense.shape[0])
    for i in range(len(e)):
        for j in range(i + 1, len(e)):
            fm = fm + (e[i] * e[j]).sum(1)  # Σ_{i<j} <e_i, e_j>: what the ½[(Σe)² − Σe²] trick computes
    h = torch.cat(([dense] if s.use_dense else []) + e, 1)
    for linear in (model.deep.layers if model.deep is not None else []):
        h = torch.relu(linear(h))
    expected = first + fm + model.head(h).squeeze(1)
    torch.testing.assert_close(model(dense, sparse), expected, rtol=1e-5, atol=1e-5)


def test_tables_hold_the_first_order_column_and_cost_is_the_formula():
    s = structure()
    model = DeepFM(s, seed=0)
    assert s.stored_dims == [D + 1] * 3 and s.table_dims == [D] * 3
    assert [model.sparse.tables[n].weight.shape for n in "abc"] == [(7, D + 1), (9, D + 1), (5, D + 1)]
    assert len(model.sparse.groups) == 1  # one width: one fused lookup
    cost = measure(model)
    w = 3 + 3 * D
    linears = (2 * 3 + 1) + (2 * w * 8 + 8) + (2 * 8 * 6 + 6) + (2 * 6 + 1)
    assert cost.flops == linears + 3 * 3 * D + D
    assert cost.table_params == (7 + 9 + 5) * (D + 1)
    assert cost.params == (3 + 1) + (w * 8 + 8) + (8 * 6 + 6) + (6 + 1) + cost.table_params
    model.enable_dim_gate()
    assert measure(model).params == cost.params + 1 + 3 + D  # the gate, while compressing


def test_structure_round_trips_and_the_family_is_found():
    s = structure(batch_norm=True, dropout=0.1)
    assert structure_from_dict(s.to_dict()) == s and s.to_dict()["family"] == "deepfm"
    assert family_named("deepfm").structure_from_dict(s.to_dict()) == s
    assert s.interaction == "fm" and s.logit_layer == "head" and s.table_ranks is None


def test_one_generator_draws_everything_tables_last():
    a, b = DeepFM(structure(), seed=3), DeepFM(structure(), seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    meta = DeepFM(structure(), seed=3, hold_tables=False)
    assert not meta.holds_tables and torch.equal(meta.head.weight, a.head.weight)


def test_batch_norm_folds_into_the_same_eval_function():
    model = model_of(batch_norm=True, dropout=0.2)
    dense, sparse = inputs(model.structure, 64)
    served = fold_batch_norm(model)
    assert type(served) is DeepFM and not served.batch_norms()
    torch.testing.assert_close(served(dense, sparse), model(dense, sparse), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [{"batch_norm": True}, {"num_dense": 0, "dense_names": []}])
def test_exports_equal_the_eager_model_and_compressed_pt_round_trips(tmp_path, kw):
    model = model_of(**kw)
    s = model.structure
    export_torchscript(model, tmp_path / "m.ts")  # each checks itself against the eager model before writing
    export_onnx(model, tmp_path / "m.onnx")
    small = extract(model, Kept(use_dense=s.use_dense, feature_ids=[0, 2], dims={"a": [1, 3], "c": [1, 3]},
                                neurons={"deep.layers.0": [0, 2, 5]}))
    save_compressed(tmp_path / "c.pt", small, Kept.everything(small))
    back = read_compressed(tmp_path / "c.pt")
    assert type(back.model) is DeepFM and back.model.structure == small.structure
    dense, sparse = inputs(s)
    assert torch.equal(back.model.eval()(dense, sparse), small(dense, sparse))
    export_torchscript(back.model, tmp_path / "s.ts")


# ---- groups, masks, surgery, resources --------------------------------------------------------------------------
def masked_reference(model: DeepFM, dense_gone: bool, features: list[str], dims: list[int],
                     neurons: dict[str, list[int]]):
    """The model with removed features' tables (every column, the first-order one too) and removed shared dims
    zeroed at the source, the dense input zeroed when its block goes, removed deep neurons zeroed."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in ref.structure.feature_names:
            table = ref.sparse.tables[name].weight
            if name in features:
                table.zero_()
            table[:, dims] = 0.0
        norms = ref.batch_norms()
        for name, rows in neurons.items():
            layer = ref.neuron_layers()[name]
            if name in norms:
                norms[name].weight[rows] = 0.0
                norms[name].bias[rows] = 0.0
            else:
                layer.weight[rows] = 0.0
                layer.bias[rows] = 0.0
    return lambda dense, sparse: ref(dense * (0.0 if dense_gone else 1.0), sparse)


@pytest.mark.parametrize("kw", [{}, {"batch_norm": True}, {"deep": []}, {"num_dense": 0, "dense_names": []}],
                         ids=["plain", "bn", "no-deep", "no-dense"])
def test_zeroing_the_pruned_groups_removes_exactly_their_features_dims_and_neurons(kw):
    model = model_of(**kw)
    s = model.structure
    sets = build_group_sets(model, {"feature", "dim", "neuron"})
    assert model.dim_gate is not None and model.dim_gate.numel() == int(s.use_dense) + 3 + D
    names = [gs.name for gs in sets]
    assert names[0] == "features" and names[-1] == "dims" and sets[-1].members[0].param is model.dim_gate
    ud = int(s.use_dense)
    features = torch.zeros(ud + 3, dtype=torch.bool)
    features[ud + 1] = True  # table b goes
    if ud:
        features[0] = True  # and the dense block
    pruned = {"features": features, "dims": torch.tensor([False, True, False, True])}
    neurons = {}
    if model.deep is not None:
        pruned["neurons:deep.layers.0"] = torch.zeros(8, dtype=torch.bool)
        pruned["neurons:deep.layers.0"][[1, 5]] = True
        neurons = {"deep.layers.0": [1, 5]}
    expected = masked_reference(model, bool(ud), ["b"], [1, 3], neurons)(*inputs(s))
    apply_masks_(model, sets, pruned)
    torch.testing.assert_close(model(*inputs(s)), expected, rtol=1e-5, atol=1e-5)
    kept = kept_from_masks(model, sets, pruned)
    assert (kept.use_dense, kept.feature_ids, kept.dims) == (False, [0, 2], {"a": [0, 2], "c": [0, 2]})
    small = extract(model, kept)
    assert small.dim_gate is None and small.structure.embedding_dim == 2
    torch.testing.assert_close(small(*inputs(s)), expected, rtol=1e-5, atol=1e-5)


def test_kinds_blocks_and_what_masks_cannot_leave():
    model = model_of()
    with pytest.raises(ValueError, match=r"group kinds \['pair'\] do not exist in a DeepFM"):
        build_group_sets(model, {"feature", "pair"})
    (dims,) = build_group_sets(model, {"dim"}, dim_block=2)
    assert dims.num_groups == 2 and dims.width == 2
    assert kept_from_masks(model, [dims], {"dims": torch.tensor([True, False])}).dims["a"] == [2, 3]
    (features,) = build_group_sets(model, {"feature"})
    with pytest.raises(ValueError, match="prune every input"):
        kept_from_masks(model, [features], {"features": torch.ones(4, dtype=torch.bool)})


def random_kept(s: DeepFMStructure, rng: random.Random) -> Kept:
    while True:
        use_dense = s.use_dense and rng.random() < 0.6
        features = [f for f in s.feature_ids if rng.random() < 0.7]
        if use_dense or features:
            break
    dims = sorted(rng.sample(range(s.embedding_dim), rng.randint(1, s.embedding_dim)))
    neurons = {name: sorted(rng.sample(range(w), rng.randint(1, w)))
               for name, w in zip(s.hidden_names, s.deep) if rng.random() < 0.8}
    return Kept(use_dense=use_dense, feature_ids=features, dims={s.sparse_names[f]: dims for f in features},
                neurons=neurons)


@pytest.mark.parametrize("kw", [{}, {"batch_norm": True}, {"deep": []}, {"num_dense": 0, "dense_names": []}],
                         ids=["plain", "bn", "no-deep", "no-dense"])
def test_extract_equals_the_masked_model_under_any_gate(kw):
    model = model_of(**kw)
    s = model.structure
    ud = int(s.use_dense)
    rng = random.Random(7)
    dense, sparse = inputs(s)
    for trial in range(8):
        gated = copy.deepcopy(model)
        if trial % 2:  # a gate as compression leaves it: values off 1, some zeros (a removal in the gate itself)
            gate = gated.enable_dim_gate()
            with torch.no_grad():
                gate.copy_(torch.rand(gate.shape, generator=torch.Generator().manual_seed(trial)) * 1.5)
                gate[ud + 1] = 0.0
                gate[-1] = 0.0
        kept = random_kept(s, rng)
        small = extract(gated, kept)
        assert small.dim_gate is None and measure(small) == measure(DeepFM(small.structure))
        with torch.no_grad():  # the masked reference: the removals zeroed in the gate (ones where there was none)
            gate = gated.enable_dim_gate()
            for p, fid in enumerate(s.feature_ids):
                if fid not in kept.feature_ids:
                    gate[ud + p] = 0.0
            dims = next(iter(kept.dims.values()), list(range(D)))
            for k in range(D):
                if k not in dims:
                    gate[ud + 3 + k] = 0.0
        removed = {name: [r for r in range(w) if r not in kept.neurons.get(name, range(w))]
                   for name, w in zip(s.hidden_names, s.deep)}
        expected = masked_reference(gated, ud and not kept.use_dense, [], [], removed)(dense, sparse)
        torch.testing.assert_close(small(dense, sparse), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw, block", [({}, 1), ({}, 2), ({"num_dense": 0, "dense_names": []}, 1),
                                       ({"deep": []}, 2), ({"deep": [5]}, 4)])
def test_resource_model_equals_measure_of_the_extraction_on_random_masks(kw, block):
    model = model_of(**kw)
    sets = build_group_sets(model, {"feature", "dim", "neuron"}, dim_block=block)
    rm = resource_model(model, sets)
    dense_cost = measure(extract(model, Kept.everything(model)))
    assert (rm.dense["flops"], rm.dense["params"]) == (dense_cost.flops, dense_cost.params)
    gen = torch.Generator().manual_seed(block)
    checked = 0
    for _ in range(40):
        masks = {gs.name: torch.rand(gs.num_groups, generator=gen) < 0.4 for gs in sets}
        for gs in sets:
            masks[gs.name][torch.randint(gs.num_groups, (1,), generator=gen)] = False  # one survives per set
        try:
            kept = kept_from_masks(model, sets, masks)
        except ValueError:
            continue
        cost = measure(extract(model, kept))
        assert rm.of_masks(masks) == {"flops": cost.flops, "params": cost.params}
        checked += 1
    assert checked > 20
    # Subsets of the sets (absent sets prune nothing), and the NumPy fast path agrees with `evaluate`.
    for kinds in ({"neuron"}, {"dim"}, {"feature"}):
        sub = build_group_sets(model, kinds, dim_block=block)
        if sub:
            assert resource_model(model, sub).dense == rm.dense
    ranks = torch.stack([torch.randperm(rm.max_groups, generator=gen) for _ in sets]).numpy()
    k = torch.tensor([[min(1, gs.num_groups - 1) for gs in sets]]).numpy()
    grid = torch.from_numpy(ranks[None] < k[:, :, None])
    flops, params = rm.evaluate(grid)
    fast = rm.evaluate_bottom_k(ranks, k)
    assert fast[0][0] == pytest.approx(float(flops[0])) and fast[1][0] == pytest.approx(float(params[0]))


def test_a_bad_deepfm_config_is_one_line_naming_the_key(tmp_path):
    from omegaconf import OmegaConf

    from umec_lightning.config import ConfigError
    from umec_lightning.models.family import family_of

    cfg = OmegaConf.create({"family": "deepfm", "name": "deepfm", "embedding_dim": 4, "deep": [8, -1]})
    meta = type("Meta", (), {"sparse_names": ["a"], "table_sizes": [3], "dense_names": ["x"]})
    with pytest.raises(ConfigError, match="config key `model.deep`") as err:
        family_of(cfg).dense_structure(cfg, meta)
    assert "\n" not in str(err.value)
