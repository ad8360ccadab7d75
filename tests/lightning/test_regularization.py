"""Regularization on the module: the embedding L2 on the rows a batch touches (or every row), weight decay on
everything but the tables, and the learning-rate decay on a validation plateau."""

import functools

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from umec_lightning.callbacks.plateau import PlateauDecay

from tests.lightning.test_module import RandomBatches, tiny
from umec_lightning.module import CTRModule


def test_touched_rows_get_exactly_their_l2_gradient_and_stay_sparse():
    model = tiny()
    module = CTRModule(model, embedding_l2=0.3, embedding_rows="touched")
    sparse = torch.tensor([[1, 2, 0], [1, 3, 4], [6, 2, 4]])  # row 1 of table a twice: still once
    module.embedding_penalty(sparse).backward()
    group = model.sparse.groups[0]
    grad = group.weight.grad
    assert grad.is_sparse
    dense = grad.to_dense()
    touched = torch.zeros(group.weight.shape[0], dtype=torch.bool)
    for f, offset in enumerate(group.row_offsets):
        touched[offset + sparse[:, f].unique()] = True
    torch.testing.assert_close(dense[touched], 0.3 * group.weight.detach()[touched])
    assert torch.all(dense[~touched] == 0)
    weights = torch.cat([model.sparse.tables[n].weight.detach()[sparse[:, f].unique()] for f, n in
                         enumerate(["a", "b", "c"])])
    torch.testing.assert_close(module.embedding_penalty(sparse).detach(), 0.15 * weights.square().sum())


def test_all_rows_rule_is_fuxictrs_whole_table_term():
    model = tiny()
    module = CTRModule(model, embedding_l2=0.1, embedding_rows="all")
    module.embedding_penalty(torch.zeros(4, 3, dtype=torch.long)).backward()
    weight = model.sparse.groups[0].weight
    torch.testing.assert_close(weight.grad.to_dense() if weight.grad.is_sparse else weight.grad, 0.1 * weight.detach())


def test_dense_l2_decays_everything_but_the_tables_which_stay_sparse_under_sgd():
    model = tiny()
    module = CTRModule(model, dense_l2=0.01, embedding_l2=0.01)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(RandomBatches(model.structure), batch_size=None))
    tables_group, rest = trainer.optimizers[0].param_groups
    assert tables_group["weight_decay"] == 0 and rest["weight_decay"] == 0.01
    assert {id(p) for p in tables_group["params"]} == {id(g.weight) for g in model.sparse.groups}
    assert module._densify == []  # plain SGD with the tables' group undecayed keeps their gradients sparse


class ScriptedValidation(CTRModule):
    """Logs a scripted validation AUC (the module's own metrics are not what is tested)."""

    def __init__(self, model, values, **kwargs):
        super().__init__(model, **kwargs)
        self.values = list(values)

    def on_validation_epoch_end(self):
        self.val_metrics.reset()
        self.val_logloss.reset()
        self.log("train/val/auc", self.values.pop(0))


def test_plateau_decay_multiplies_the_rate_after_patience_flat_checks_and_checkpoints_its_state(tmp_path):
    model = tiny()
    module = ScriptedValidation(model, [0.6, 0.7, 0.69, 0.7, 0.65, 0.6, 0.5, 0.5], lr=0.1)
    decay = PlateauDecay("train/val/auc", "max", factor=0.1, patience=2, min_lr=0.0005)
    fit = functools.partial(pl.Trainer, accelerator="cpu", max_epochs=8, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    loader = DataLoader(RandomBatches(model.structure, n=2), batch_size=None)
    trainer = fit(callbacks=[decay])
    trainer.fit(module, loader, loader)
    # Flat checks: 0.69, 0.7 (not > 0.7) -> decay; 0.65, 0.6 -> decay; 0.5, 0.5 -> decay to the floor.
    assert [round(d["lr"], 6) for d in decay.decays] == [0.01, 0.001, 0.0005]
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0005
    state = decay.state_dict()
    again = PlateauDecay("train/val/auc", "max", factor=0.1, patience=2)
    again.load_state_dict(state)
    assert again.best == decay.best == pytest.approx(0.7) and again.decays == decay.decays
