"""Batch norm and dropout in the MLPs, and compression that keeps them right: a neuron carries its batch-norm
channel, extraction equals the masked model, the served model has the norm folded into its Linear."""

import pytest
import torch

from umec_lightning.compressed import load_compressed, save_compressed
from umec_lightning.compression.export import export_onnx, export_torchscript, random_inputs
from umec_lightning.compression.extract import extract, masked_copy
from umec_lightning.compression.groups import build_group_sets
from umec_lightning.compression.kept import Kept
from umec_lightning.compression.lowrank import LowRankFeature, LowRankSVD
from umec_lightning.compression.method import finish_and_extract
from umec_lightning.data.core import Batch
from umec_lightning.models import DLRM, DLRMStructure, dense_structure, fold_batch_norm, measure

NAMES = ["C1", "C2", "C3"]


def regularized(interaction="dot", batch_norm=True, dropout=0.3, seed=0) -> DLRM:
    """A DLRM with batch norm and dropout on every hidden layer, its norms moved off their initial state (running
    statistics from a few training forwards, γ and β drawn) so that folding them is not the identity."""
    s = dense_structure(sparse_names=NAMES, table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 6, 4],
                        top=[12, 8, 1], num_dense=3, interaction=interaction, batch_norm=batch_norm, dropout=dropout)
    model = DLRM(s, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(3):
        model(*random_inputs(s, 64, seed=int(torch.randint(0, 1000, (1,), generator=gen))))
    with torch.no_grad():
        for norm in model.batch_norms().values():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.uniform_(-0.3, 0.3, generator=gen)
    return model.eval()


def test_settings_reach_the_hidden_layers_only():
    s = regularized().structure
    assert s.batch_norm == ["dense.layers.0", "dense.layers.1", "over.layers.0", "over.layers.1"]
    assert s.dropout == {name: 0.3 for name in s.batch_norm}
    per_mlp = dense_structure(sparse_names=NAMES, table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 4],
                              top=[8, 1], num_dense=3, batch_norm={"top": True}, dropout={"over.layers.0": 0.5})
    assert per_mlp.batch_norm == ["over.layers.0"] and per_mlp.dropout == {"over.layers.0": 0.5}
    by_name = dense_structure(sparse_names=NAMES, table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 4],
                              top=[8, 1], num_dense=3, batch_norm=["over.layers.0"])
    assert by_name.batch_norm == ["over.layers.0"] and by_name.dropout is None
    # Off is the canonical None, and a structure written before the keys existed reads as off.
    plain = dense_structure(sparse_names=NAMES, table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 4],
                            top=[8, 1], num_dense=3)
    legacy = plain.to_dict()
    del legacy["batch_norm"], legacy["dropout"]
    assert DLRMStructure.from_dict(legacy) == plain and plain.batch_norm is None and plain.dropout is None
    assert DLRMStructure.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad, match", [
    ({"batch_norm": {"over.layers.1": True}}, "model.batch_norm"),  # the logit layer
    ({"dropout": 1.0}, "probability"),
    ({"batch_norm": 1}, "true/false"),
])
def test_bad_settings_name_the_config_key(bad, match):
    with pytest.raises(ValueError, match=match):
        dense_structure(sparse_names=NAMES, table_sizes=[10, 20, 30], embedding_dim=4, bottom=[8, 4], top=[8, 1],
                        num_dense=3, **bad)


def test_dropout_only_in_training():
    model = regularized(batch_norm=False, dropout=0.5)
    inputs = random_inputs(model.structure, 32)
    assert torch.equal(model(*inputs), model(*inputs))  # eval: deterministic
    model.train()
    assert not torch.equal(model(*inputs), model(*inputs))


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_neuron_groups_carry_their_norm_channel(interaction):
    """A batch-normalised neuron's group is its (γ, β); zeroing the group removes the neuron exactly, and the
    physically smaller model computes what the masked one does (eval mode), norm channels sliced along."""
    model = regularized(interaction)
    sets = {gs.name: gs for gs in build_group_sets(model, ["neuron"])}
    norm = model.over.norms[0]
    members = sets["neurons:over.layers.0"].members
    assert [m.param for m in members] == [norm.weight, norm.bias]
    kept = Kept.everything(model)
    kept.neurons["over.layers.0"] = [0, 3, 4, 9]
    kept.neurons["dense.layers.0"] = [1, 2, 5, 7]
    slim, masked = extract(model, kept), masked_copy(model, kept)
    inputs = random_inputs(model.structure, 64, seed=1)
    torch.testing.assert_close(slim(*inputs), masked(*inputs), atol=1e-6, rtol=0)
    assert slim.structure.batch_norm == model.structure.batch_norm
    assert torch.equal(slim.over.norms[0].running_var, norm.running_var[[0, 3, 4, 9]])
    # The group's own hard prune (γ = β = 0 on the pruned neurons) is the same model again.
    pruned = torch.ones(12, dtype=torch.bool)
    pruned[[0, 3, 4, 9]] = False
    zeroed = masked_copy(model, Kept.everything(model))
    zeroed_sets = {gs.name: gs for gs in build_group_sets(zeroed, ["neuron"])}
    zeroed_sets["neurons:over.layers.0"].zero_(pruned)
    only_top = Kept.everything(model)
    only_top.neurons["over.layers.0"] = [0, 3, 4, 9]
    torch.testing.assert_close(zeroed(*inputs), extract(model, only_top)(*inputs), atol=1e-6, rtol=0)


def test_served_model_has_the_norms_folded(tmp_path):
    model = regularized("cat")
    served = fold_batch_norm(model)
    assert served.structure.batch_norm is None and served.structure.dropout is None
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in served.modules())
    inputs = random_inputs(model.structure, 64, seed=2)
    torch.testing.assert_close(served(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    assert measure(served) == measure(model)  # the resource model counts the served (folded) model
    # Exports write the served model and check it against the eager one (in eval mode, even if training).
    model.train()
    export_torchscript(model, tmp_path / "m.pt", inputs, atol=1e-5)
    assert model.training
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    assert not any("norms" in name for name, _ in scripted.named_buffers())
    export_onnx(model, tmp_path / "m.onnx", inputs, atol=1e-5)
    # A compressed file keeps the norms (it is what a finetune resumes from) and rebuilds them.
    save_compressed(tmp_path / "c.pt", model.eval(), Kept.everything(model))
    again = load_compressed(tmp_path / "c.pt")
    assert again.structure == model.structure
    torch.testing.assert_close(again.eval()(*inputs), model(*inputs), atol=0, rtol=0)


def test_lowrank_factorises_the_folded_layer():
    """A factorised layer has its batch norm folded in first: at full rank the factored model is the eval
    model; lowrank_feature calibrates on the norm's output (what the folded layer computes); LowRankSVD's
    spectra are the folded weights'."""
    model = regularized("cat")
    name = "over.layers.0"
    layer, norm = model.over.layers[0], model.over.norms[0]
    kept = Kept.everything(model)
    kept.ranks = {name: min(layer.in_features, layer.out_features)}
    slim = extract(model, kept)
    assert slim.structure.layer_ranks == kept.ranks
    assert name not in slim.structure.batch_norm and "over.layers.1" in slim.structure.batch_norm
    inputs = random_inputs(model.structure, 64, seed=3)
    torch.testing.assert_close(slim(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)

    method = LowRankFeature(tables=False, ranks={name: 6}, calibration_batches=2)
    method.setup(model, {"params": 0.99})
    pairs = [random_inputs(model.structure, 256, seed=k) for k in range(2)]
    result = finish_and_extract(method, model, calibration=[Batch(d, s, torch.zeros(len(d))) for d, s in pairs])
    with torch.no_grad():
        outputs = torch.cat([norm(layer(model.interaction(model.dense(d), model.sparse(s)))) for d, s in pairs])
    count, total, _ = method._moments[name]
    torch.testing.assert_close((total / count).float(), outputs.mean(0), atol=1e-5, rtol=1e-5)
    assert result.model.structure.layer_ranks[name] == 6
    assert name not in (result.model.structure.batch_norm or [])

    svd = LowRankSVD(tables=False)
    svd.setup(model, {"params": 0.9})
    folded = norm.weight.detach()[:, None] * layer.weight.detach() / (norm.running_var + norm.eps).sqrt()[:, None]
    energy = svd._energy(model, name, "linear", model.linear_layers())
    torch.testing.assert_close(energy.float(), torch.linalg.svdvals(folded).square(), atol=1e-4, rtol=1e-4)
