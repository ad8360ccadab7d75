"""DCNv2 (models/dcnv2.py), the second model family: its forward is the paper's formulas, its cost is read off
its modules, and it goes through what every family shares (export, compressed.pt, batch-norm folding, the family
registry)."""

from __future__ import annotations

import pytest
import torch

from umec_lightning.compressed import read_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.kept import Kept
from umec_lightning.models import fold_batch_norm, measure
from umec_lightning.models.dcnv2 import DCNv2, DCNv2Structure, MixtureCrossLayer, dense_dcnv2_structure
from umec_lightning.models.family import family_named, structure_from_dict


def structure(**kw) -> DCNv2Structure:
    args = dict(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, num_dense=3, deep=[8, 6],
                cross_layers=2, cross_rank=None, experts=1, stacking="parallel", dense_names=["x", "y", "z"])
    return dense_dcnv2_structure(**{**args, **kw})


def inputs(s: DCNv2Structure, batch: int = 5):
    return random_inputs(s, batch_size=batch, seed=1)


@pytest.mark.parametrize("stacking", ["parallel", "stacked"])
def test_full_rank_forward_is_the_cross_formula(stacking):
    s = structure(stacking=stacking)
    model = DCNv2(s, seed=0).eval()
    dense, sparse = inputs(s)
    normed = model.dense(dense)  # the batch norm in eval mode: (x - running mean) / sqrt(running var + eps)
    bn = model.dense
    assert torch.allclose(normed, (dense - bn.running_mean) / (bn.running_var + bn.eps).sqrt() * bn.weight + bn.bias)
    x0 = torch.cat([normed] + [model.sparse.tables[n].weight[sparse[:, i]] for i, n in enumerate("abc")], 1)
    x = x0
    for layer in model.cross.layers:
        x = x0 * (x @ layer.linear.weight.T + layer.linear.bias) + x
    h = x0 if stacking == "parallel" else x
    for linear in model.deep.layers:
        h = torch.relu(linear(h))
    out = torch.cat([x, h], 1) if stacking == "parallel" else h
    assert torch.allclose(model(dense, sparse), model.head(out).squeeze(1), atol=1e-6)


def test_mixture_cross_layer_is_the_dcn_mix_formula():
    layer = MixtureCrossLayer(width=6, rank=2, experts=3)
    torch.nn.init.normal_(layer.bias)
    x0, x = torch.randn(4, 6), torch.randn(4, 6)
    experts = [x0 * (torch.tanh(torch.tanh(x @ v.weight.T) @ c.weight.T) @ u.weight.T + layer.bias)
               for v, c, u in zip(layer.v, layer.c, layer.u)]
    gates = torch.softmax(torch.cat([x @ g.weight.T for g in layer.gates], 1), 1)
    expected = sum(gates[:, k:k + 1] * experts[k] for k in range(3)) + x
    assert torch.allclose(layer(x0, x), expected, atol=1e-6)


@pytest.mark.parametrize("rank", [None, 2])
def test_cost_is_read_off_the_modules(rank):
    s = structure(cross_rank=rank, experts=3)
    cost = measure(DCNv2(s, seed=0))
    w = 3 + 3 * 4  # x0: dense + 3 tables of 4
    if rank is None:  # W×W with bias per cross layer
        cross_flops, cross_params = 2 * (2 * w * w + w), 2 * (w * w + w)
    else:  # per expert V (w→r), C (r→r), U (r→w), gate (w→1), no biases; one shared bias per layer
        per_expert = 2 * (w * rank + rank * rank + rank * w + w)
        cross_flops = 2 * 3 * per_expert
        cross_params = 2 * (3 * per_expert // 2 + w)
    deep_flops = (2 * w * 8 + 8) + (2 * 8 * 6 + 6)
    deep_params = (w * 8 + 8) + (8 * 6 + 6)
    head_in = w + 6
    assert cost.flops == cross_flops + deep_flops + 2 * head_in + 1
    assert cost.table_params == (7 + 9 + 5) * 4
    dense_norm = 2 * 3  # the dense block's batch norm: a scale and a shift per dense column
    assert cost.params == cross_params + deep_params + head_in + 1 + cost.table_params + dense_norm
    assert measure(DCNv2(structure(cross_rank=rank, experts=3, dense_norm="none"), seed=0)).params \
        == cost.params - dense_norm


@pytest.mark.parametrize("dense_norm", ["batch", "none"])
def test_the_dense_norm_keeps_plain_sgd_finite_on_large_dense_values(dense_norm):
    """The cross layers multiply x0 by itself: raw dense values of Criteo's size (log1p up to about 12) make plain
    SGD at the shipped lr 0.1 blow up within a few steps; the default batch norm keeps the same steps finite."""
    s = structure(dense_norm=dense_norm, cross_layers=3)
    model = DCNv2(s, seed=0, sparse_grad=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        dense = torch.rand(256, 3, generator=gen) * 12
        sparse = torch.stack([torch.randint(0, n, (256,), generator=gen) for n in (7, 9, 5)], 1)
        labels = (dense[:, 0] > 6).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    finite = all(torch.isfinite(torch.tensor(losses))) and max(losses) < 10
    assert finite == (dense_norm == "batch"), losses


def test_a_narrower_input_makes_the_cross_network_quadratically_cheaper():
    wide, narrow = structure(embedding_dim=8, deep=[]), structure(embedding_dim=4, deep=[])
    cross = [measure(DCNv2(s, seed=0)).flops for s in (wide, narrow)]
    w_wide, w_narrow = wide.width, narrow.width
    assert cross[0] - (2 * w_wide + 1) == 2 * (2 * w_wide ** 2 + w_wide)  # the head aside: cross layers alone
    assert cross[1] - (2 * w_narrow + 1) == 2 * (2 * w_narrow ** 2 + w_narrow)


def test_the_family_rebuilds_its_structure_from_a_saved_dict():
    s = structure(batch_norm=True, dropout=0.1, cross_rank=2, experts=2)
    assert structure_from_dict(s.to_dict()) == s
    assert family_named("dcnv2").structure_from_dict(s.to_dict()) == s
    assert family_named("dlrm").name == "dlrm"
    with pytest.raises(ValueError, match="config key `model.family`: no model family 'nope'"):
        family_named("nope")


def test_batch_norm_folds_into_the_same_eval_function():
    s = structure(batch_norm=True, dropout=0.2)
    model = DCNv2(s, seed=0)
    model.train()
    dense, sparse = inputs(s, 64)
    model(dense, sparse)  # running statistics move off their defaults
    model.eval()
    served = fold_batch_norm(model)
    assert type(served) is DCNv2 and not served.batch_norms()
    assert torch.allclose(served(dense, sparse), model(dense, sparse), atol=1e-5)


@pytest.mark.parametrize("rank", [None, 2])
def test_exports_equal_the_eager_model_and_compressed_pt_round_trips(tmp_path, rank):
    s = structure(cross_rank=rank, experts=2, batch_norm=True)
    model = DCNv2(s, seed=0).eval()
    export_torchscript(model, tmp_path / "m.pt")  # each checks itself against the eager model before writing
    export_onnx(model, tmp_path / "m.onnx")
    save_compressed(tmp_path / "c.pt", model, Kept.everything(model))
    back = read_compressed(tmp_path / "c.pt")
    assert type(back.model) is DCNv2 and back.model.structure == s
    dense, sparse = inputs(s)
    assert torch.equal(back.model.eval()(dense, sparse), model(dense, sparse))
    assert back.kept.neurons == {"deep.layers.0": list(range(8)), "deep.layers.1": list(range(6))}


def test_without_dense_features_x0_is_the_tables_alone():
    s = structure(num_dense=0, dense_names=[])
    assert not s.use_dense and s.width == 12
    model = DCNv2(s, seed=0)
    dense, sparse = random_inputs(s, batch_size=3)
    assert dense.shape == (3, 0) and model(dense, sparse).shape == (3,)
