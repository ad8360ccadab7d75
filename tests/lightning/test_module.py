"""The LightningModule on a tiny model: manual optimization with ADMM, checkpointed state, NaN stop, and
every optimizer choice with every kind of method hook."""

import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from umec_lightning.callbacks.compression import Compression

from umec_lightning.compression.group_lasso import GroupLasso
from umec_lightning.compression.taylor import Taylor
from umec_lightning.compression.umec import UMECMethod
from umec_lightning.data import Batch
from umec_lightning.models import DLRM, dense_structure
from umec_lightning.module import CTRModule, NonFiniteLossError, accepts_sparse_grads


class RandomBatches(Dataset):
    def __init__(self, structure, n=12, batch=32):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(n):
            dense = torch.rand(batch, structure.num_dense, generator=g)
            sparse = torch.stack([torch.randint(0, r, (batch,), generator=g) for r in structure.table_sizes], 1)
            label = (dense[:, 0] + 0.2 * torch.rand(batch, generator=g) > 0.6).float()
            self.items.append(Batch(dense=dense, sparse=sparse, label=label))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny():
    s = dense_structure(sparse_names=["a", "b", "c"], table_sizes=[7, 9, 5], embedding_dim=4, bottom=[8, 4],
                        top=[8, 1], num_dense=3)
    return DLRM(s, seed=0)


def trainer(**kw):
    return pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kw)


def loader(model):
    return DataLoader(RandomBatches(model.structure), batch_size=None)


def umec_method(model, kinds, budgets):
    method = UMECMethod(kinds, admm={})
    method.setup(model, budgets)
    return method


def test_admm_runs_inside_manual_optimization_and_updates_state():
    model = tiny()
    method = umec_method(model, {"feature", "neuron", "dim"}, {"flops": 0.5})
    compression = Compression(method, every_n_steps=5)
    module = CTRModule(model, lr=0.1, phase="admm", compression=compression)
    trainer().fit(module, loader(model))  # the module brings its Compression callback (configure_callbacks)
    umec = method.umec
    assert int(umec.state.step) == 12
    assert float(umec.state.z.sum()) > 0  # dense model is over a 0.5 budget, so z rose
    assert [h["step"] for h in compression.history] == [1, 6, 11, 12]  # every 5 steps, and the last
    assert compression.extracted is not None and compression.extracted.model is not model  # extracted at fit end
    ckpt = {}
    module.on_save_checkpoint(ckpt)
    assert ckpt["dlrm_structure"] == model.structure.to_dict()
    fresh = Compression(umec_method(tiny(), {"feature", "neuron", "dim"}, {"flops": 0.5}))
    fresh.load_state_dict(compression.state_dict())
    assert torch.equal(fresh.method.umec.state.flat(), umec.state.flat())
    assert fresh.history == compression.history


class PoisonAt(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 2:
            with torch.no_grad():
                pl_module.model.over.layers[0].weight.fill_(float("nan"))


def test_nan_loss_stops_with_step_and_last_duals():
    model = tiny()
    module = CTRModule(model, lr=0.1, phase="admm",
                       compression=Compression(umec_method(model, {"neuron"}, {"flops": 0.8})))
    with pytest.raises(NonFiniteLossError, match=r"admm step 3 .*last dual values seen: .*z/flops="):
        trainer(callbacks=[PoisonAt()]).fit(module, loader(model))


def test_a_deferred_nan_check_names_the_steps_it_covers():
    """On an accelerator the loss is read every `nan_check_every` steps (no host sync per step); the same
    path on CPU when set: the NaN from step 3 is reported at the check after step 3."""
    model = tiny()
    module = CTRModule(model, lr=0.1, phase="admm", nan_check_every=4)
    with pytest.raises(NonFiniteLossError, match=r"non-finite between admm step 0 .* and step 3 \(checked every 4"):
        trainer(callbacks=[PoisonAt()]).fit(module, loader(model))


def test_a_nan_is_caught_before_a_checkpoint_is_written(tmp_path):
    """With a check interval longer than the epoch, the epoch-end checkpoint itself runs the check."""
    model = tiny()
    module = CTRModule(model, lr=0.1, phase="admm", nan_check_every=10_000)
    fit = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=[PoisonAt(),
                                pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_on_train_epoch_end=True)])
    with pytest.raises(NonFiniteLossError, match="non-finite between"):
        fit.fit(module, loader(model))
    assert not list(tmp_path.glob("*.ckpt"))


# ---- the optimizer option -------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": functools.partial(torch.optim.SGD),
    "sgd_momentum": functools.partial(torch.optim.SGD, momentum=0.9),
    "adam": functools.partial(torch.optim.Adam),
    "adagrad": functools.partial(torch.optim.Adagrad),
}


def tables(model):
    return dict(model.sparse.tables.items())


@pytest.mark.parametrize("name, sparse_kept", [("sgd", True), ("sgd_momentum", False), ("adam", False),
                                               ("adagrad", True)])
def test_every_optimizer_trains_the_tables_sparse_where_it_can_dense_where_it_must(name, sparse_kept):
    model = tiny()
    before = {k: t.weight.detach().clone() for k, t in tables(model).items()}
    module = CTRModule(model, lr=0.05, phase="train", optimizer=OPTIMIZERS[name])
    trainer().fit(module, loader(model))
    assert type(module.optimizers().optimizer) is OPTIMIZERS[name].func
    for key, table in tables(model).items():
        assert table.sparse  # the model itself is unchanged: only the gradients handed to the optimizer
        assert table.grad.is_sparse is sparse_kept
        assert not torch.equal(table.weight, before[key]), key
    assert math.isfinite(module.last_loss)


def test_the_module_lr_is_the_optimizer_lr_whatever_the_factory_binds():
    module = CTRModule(tiny(), lr=0.03, optimizer=functools.partial(torch.optim.Adam, lr=0.5))
    assert module.configure_optimizers().param_groups[0]["lr"] == 0.03


def test_sparse_gradient_support_is_read_off_the_optimizer():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert accepts_sparse_grads(torch.optim.SGD(p, lr=0.1))
    assert accepts_sparse_grads(torch.optim.Adagrad(p, lr=0.1))
    assert not accepts_sparse_grads(torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert not accepts_sparse_grads(torch.optim.SGD(p, lr=0.1, weight_decay=1e-4))
    assert not accepts_sparse_grads(torch.optim.Adagrad(p, lr=0.1, weight_decay=1e-4))
    assert not accepts_sparse_grads(torch.optim.Adam(p))
    assert not accepts_sparse_grads(torch.optim.AdamW(p))


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd_momentum"])
@pytest.mark.parametrize("method_name", ["umec", "group_lasso", "taylor"])
def test_every_compression_method_trains_under_every_optimizer(name, method_name):
    """UMEC's prox follows the step, group lasso adds a dense gradient to the (sparse) tables, Taylor reads
    the gradients: each runs its stage under each optimizer."""
    model = tiny()
    if method_name == "umec":
        method = umec_method(model, {"feature", "neuron", "dim"}, {"flops": 0.5})
    else:
        method = GroupLasso(["feature", "dim", "neuron"], lam=0.01) if method_name == "group_lasso" \
            else Taylor(["feature", "neuron"], rounds=2, steps_per_round=5)
        method.setup(model, {"flops": 0.5})
    module = CTRModule(model, lr=0.05, phase="compress", compression=Compression(method), optimizer=OPTIMIZERS[name])
    trainer().fit(module, loader(model))
    assert math.isfinite(module.last_loss)
    if method_name == "umec":
        assert int(method.umec.state.step) == 12 and float(method.umec.state.z.sum()) > 0
    kept = method.finish(model).kept
    assert kept is not None
