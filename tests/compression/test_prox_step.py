"""The prox's step under the optimizer that trains the weights (admm.prox_step, compression/prox_step.py), and
the ranking of inputs that no model within the budget can keep."""

import pytest
import torch

from umec_lightning.compression import UMEC, ADMMConfig
from umec_lightning.compression.prox_step import group_gain, preconditioner
from umec_lightning.models import DLRM, dense_structure

from .test_admm import data, kinds_for


def tiny(interaction="dot"):
    """test_admm's model with dense table gradients (Adam refuses sparse ones)."""
    s = dense_structure(sparse_names=["C1", "C2", "C3", "C4"], table_sizes=[10, 20, 30, 40], embedding_dim=4,
                        bottom=[8, 4], top=[8, 1], num_dense=3, interaction=interaction)
    return DLRM(s, seed=0, sparse_grad=False)


def _loss_step(model, optimizer, batch):
    dense, sparse, labels = batch
    optimizer.zero_grad()
    torch.nn.functional.binary_cross_entropy_with_logits(model(dense, sparse), labels).backward()
    optimizer.step()


def test_the_gain_is_the_step_the_optimizer_took_per_unit_of_gradient():
    """At Adam's first step the update is lr·g/(|g| + ε) per weight, so ||Δw_g|| / ||g_g|| over a group is exactly
    lr times the gain; under SGD there is no preconditioner (the step is the lr)."""
    model = tiny("dot")
    umec = UMEC(model, kinds_for("dot"), ADMMConfig(budgets={"flops": 0.5}))
    assert preconditioner(torch.optim.SGD(model.parameters(), lr=0.1)) is None
    lr = 1e-3
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    _loss_step(model, optimizer, data(model))
    gain = group_gain(umec.packed, preconditioner(optimizer))
    deltas = {id(p): p.detach() - b for p, b in zip(model.parameters(), before)}
    from umec_lightning.compression.groups import slice_sum

    moved = umec.packed.group_sums(lambda p, d: slice_sum(deltas[id(p)].square(), d), torch.float64).sqrt()
    grads = umec.packed.group_sums(lambda p, d: slice_sum(p.grad.square(), d), torch.float64).sqrt()
    valid = umec.packed.valid & (grads > 0)
    assert int(valid.sum()) > 10
    torch.testing.assert_close(moved[valid] / grads[valid], lr * gain[valid], rtol=1e-4, atol=0)
    assert float(gain[valid].min()) > 10  # Adam's first step: far more per unit of gradient than the lr


def test_the_gain_of_adagrad_on_sparse_tables_without_densifying_them():
    """Adagrad keeps the tables' gradients sparse (Criteo-size tables): the gain is computed on the rows a batch
    touched, and equals the step Adagrad took per unit of gradient, as for dense gradients."""
    s = dense_structure(sparse_names=["C1", "C2", "C3", "C4"], table_sizes=[10, 20, 30, 40], embedding_dim=4,
                        bottom=[8, 4], top=[8, 1], num_dense=3)
    model = DLRM(s, seed=0)  # sparse table gradients
    umec = UMEC(model, kinds_for("dot"), ADMMConfig(budgets={"flops": 0.5}))
    lr = 0.05
    optimizer = torch.optim.Adagrad(model.parameters(), lr=lr)
    before = [p.detach().clone() for p in model.parameters()]
    _loss_step(model, optimizer, data(model))
    assert any(p.grad is not None and p.grad.is_sparse for p in model.parameters())
    gain = group_gain(umec.packed, preconditioner(optimizer))
    deltas = {id(p): p.detach() - b for p, b in zip(model.parameters(), before)}
    from umec_lightning.compression.groups import slice_sum

    moved = umec.packed.group_sums(lambda p, d: slice_sum(deltas[id(p)].square(), d), torch.float64).sqrt()
    grads = umec.packed.group_sums(lambda p, d: slice_sum(p.grad.to_dense().square(), d), torch.float64).sqrt()
    valid = umec.packed.valid & (grads > 0)
    torch.testing.assert_close(moved[valid] / grads[valid], lr * gain[valid], rtol=1e-4, atol=0)


def _pruned_norm_and_y(prox_step: str, steps: int = 40):
    """Adam at lr 1e-3 with s held at half of every set: the pruned groups' norm share and the duals y."""
    model = tiny("dot")
    config = ADMMConfig(budgets={"flops": 0.5}, normalize_norms=True, prox_step=prox_step, eta_s=1e-9)
    umec = UMEC(model, kinds_for("dot"), config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    umec.set_optimizer(optimizer)
    umec.state.s = (umec.packed.num_groups.double() - 1) / 2
    umec.state.y = torch.ones_like(umec.state.y)
    batch = data(model)
    for _ in range(steps):
        _loss_step(model, optimizer, batch)
        umec.step(1e-3)
    norms = umec.packed.norms().double()
    pruned = umec._pruned_grid()
    return float(norms[pruned].sum() / norms[umec.packed.valid].sum()), umec.state.y.clone()


def test_an_adaptive_prox_holds_pruned_groups_at_zero_under_adam():
    """Under Adam a nominal prox (lr 1e-3) barely shrinks the pruned groups: Adam moves them ~lr per weight per
    step whatever their gradient. The adaptive one shrinks them by the step Adam took, and y stops climbing."""
    nominal_share, nominal_y = _pruned_norm_and_y("nominal")
    adaptive_share, adaptive_y = _pruned_norm_and_y("adaptive")
    assert nominal_share > 0.05
    assert adaptive_share < nominal_share / 5
    assert float(adaptive_y.sum()) < float(nominal_y.sum())


@pytest.mark.parametrize("host", [True, False])
def test_under_sgd_the_adaptive_prox_is_the_nominal_one_bit_for_bit(host):
    runs = []
    for prox_step in ("nominal", "adaptive"):
        model = tiny("dot")
        umec = UMEC(model, kinds_for("dot"), ADMMConfig(budgets={"flops": 0.5}, eta_s=0.2, prox_step=prox_step))
        umec._host = host
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        umec.set_optimizer(optimizer)
        batch = data(model)
        for _ in range(30):
            _loss_step(model, optimizer, batch)
            umec.step(0.1)
        runs.append((model, umec))
    (a, ua), (b, ub) = runs
    assert int(ua._k().sum()) > 0
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for key in ("s", "y", "z"):
        assert torch.equal(getattr(ua.state, key), getattr(ub.state, key))


def test_cpu_fast_path_equals_the_device_path_with_per_group_steps():
    runs = []
    for host in (True, False):
        model = tiny("dot")
        umec = UMEC(model, kinds_for("dot"), ADMMConfig(budgets={"flops": 0.5}, eta_s=0.2, prox_step="adaptive",
                                                        normalize_norms=True))
        umec._host = host
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        umec.set_optimizer(optimizer)
        batch = data(model)
        for _ in range(40):
            _loss_step(model, optimizer, batch)
            umec.step(1e-3)
        runs.append((model, umec))
    (a, ua), (b, ub) = runs
    assert int(ua._k().sum()) > 0 and float(ua.state.y.sum()) > 0
    for key in ("s", "y", "z"):
        torch.testing.assert_close(getattr(ua.state, key), getattr(ub.state, key), rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_prox_step_is_validated():
    with pytest.raises(ValueError, match="prox_step"):
        ADMMConfig(budgets={"flops": 0.5}, prox_step="adam")


def _feature_weights(budgets: dict):
    s = dense_structure(sparse_names=["C1", "C2", "C3"], table_sizes=[10, 20, 30], embedding_dim=4,
                        bottom=[16, 4], top=[8, 1], num_dense=3)
    model = DLRM(s, seed=0, sparse_grad=False)
    config = ADMMConfig(budgets=budgets, group_score="holdout", warmup_steps=2, normalize_norms=True)
    umec = UMEC(model, {"feature"}, config)
    (features,) = umec.sets
    umec.holdout_feature_scores = torch.tensor([5.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # dense block first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        _loss_step(model, optimizer, data(model))
        umec.step(0.1)
    return umec, features


def test_an_input_no_model_within_the_budget_can_keep_is_ranked_first_to_go():
    """The dense block (a bottom MLP) alone costs more than a tight FLOPs budget: ranked by its worth it would be
    the set's last group, where ADMM stalls; it is ranked lowest instead. Under a budget it fits, unchanged."""
    umec, features = _feature_weights({"flops": 0.9})
    assert not bool(umec._features_beyond_budget().any())
    dense = features.labels.index("dense")
    assert int(umec.packed.norms()[0, : features.num_groups].argmax()) == dense

    umec, features = _feature_weights({"flops": 0.2})
    beyond = umec._features_beyond_budget()
    assert beyond.tolist() == [label == "dense" for label in features.labels]
    assert int(umec.packed.norms()[0, : features.num_groups].argmin()) == dense
