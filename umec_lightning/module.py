"""The LightningModule: trains a DLRM. The loss (BCE with logits) lives here, not in the model.

Manual optimization, because a compression step is not "loss.backward(); opt.step()": UMEC follows the SGD
step on the weights with the proximal step and the updates of s, y and z (method.md §3), Taylor pruning reads
the gradients before the step, group lasso adds a loss term. Lightning has no hook inside a manual step, so
while compressing the module calls the `Compression` callback's (`callbacks/compression.py`: `loss`,
`after_backward`, `after_step`) where its step has them, and lists that callback among its own; the callback
owns the method, its state, its logging and the extraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from .distributed import average_gradients, broadcast_parameters, sparse_tables
from .metrics import LogLoss, ctr_metrics
from .models import DLRM
from .sharded.checkpoint import read_checkpoint_into


class NonFiniteLossError(RuntimeError):
    pass


OptimizerFactory = Callable[..., torch.optim.Optimizer]  # (params, lr=...) -> optimizer, e.g. a Hydra `_partial_`


# eval.monitor -> (the logged validation metric a best checkpoint, early stopping and the learning-rate decay
# follow, its mode). auc_logloss is FuxiCTR's default monitor, AUC − logloss.
MONITORS = {"auc": "max", "logloss": "min", "auc_logloss": "max"}
EMBEDDING_ROWS = ("auto", "touched", "all")


def accepts_sparse_grads(optimizer: torch.optim.Optimizer, tables: list[nn.Parameter] | None = None) -> bool:
    """Whether `optimizer` takes the sparse gradients of `sparse=True` embedding tables *and* the dense ones
    a method may add to the same table (group lasso's penalty): plain SGD and Adagrad without weight decay
    (SGD's momentum buffer and both optimizers' weight decay mix sparse and dense tensors, which torch refuses;
    Adam, AdamW, RMSprop refuse sparse gradients outright). With `tables`, only the parameter groups holding
    them count (weight decay on the other groups' dense parameters is fine)."""
    groups = optimizer.param_groups
    if tables is not None:
        ids = {id(t) for t in tables}
        groups = [g for g in groups if any(id(p) in ids for p in g["params"])]
    if type(optimizer) is torch.optim.SGD:
        return all(not g.get("momentum") and not g.get("weight_decay") for g in groups)
    if type(optimizer) is torch.optim.Adagrad:
        return all(not g.get("weight_decay") for g in groups)
    return False


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Scale every gradient by min(1, max_norm / ||g||), ||g|| the L2 norm of all of them together; a sparse
    gradient counts its (coalesced) values, so a table's rows a batch touches once count once. Returns ||g||."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [(g.coalesce().values() if g.is_sparse else g).double().square().sum() for g in grads]
    total = torch.stack(norms).sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))  # a sparse gradient: its values, in place
    return total


def first_val_batches(datamodule, device, count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first `count` validation batches of this process as (dense, sparse, label) on `device`."""
    out = []
    for batch in datamodule.val_dataloader():
        out.append(tuple(t.to(device) for t in (batch.dense, batch.sparse, batch.label)))
        if len(out) == count:
            break
    return out


class CTRModule(pl.LightningModule):
    """`phase` prefixes every metric ("pretrain/train_loss", "compress/resource/flops", "finetune/val/auc")
    so that one W&B run or CSV file holds every phase of a run without the curves colliding. `compression`: the
    `callbacks.compression.Compression` of a compress stage, or None."""

    def __init__(
        self,
        model: DLRM,
        lr: float = 0.1,
        phase: str = "train",
        compression=None,
        auroc_bins: int | None = 1 << 16,
        log_every_n_steps: int = 50,
        optimizer: OptimizerFactory | None = None,
        nan_check_every: int | None = None,
        monitor: str = "auc",
        embedding_l2: float = 0.0,
        embedding_rows: str = "auto",
        dense_l2: float = 0.0,
        max_grad_norm: float | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.model = model  # the plain DLRM of record, checkpointed under `model.` keys
        # `model` with its tables sharded: a torchrec DistributedModelParallel around a shell of it (its dense
        # modules are `model`'s own), set by a strategy that shards them (sharded/strategy.py) for the duration
        # of a Trainer call, else None. The steps run it (`step_model`), the hooks its inner DLRM (`hook_model`).
        self.sharded: nn.Module | None = None
        self.lr = lr
        # None: plain SGD (reference DLRM / UMEC paper). Called as `optimizer(params, lr=self.lr)`: `lr` is the
        # one learning rate of the module (also η1 of UMEC's prox), it overrides one bound in the factory.
        self.optimizer_factory = optimizer
        self._densify: list[nn.Parameter] = []  # sparse-gradient tables whose grads the optimizer needs dense
        self._local_tables: list[nn.Parameter] = []  # under DDP: the sparse tables it leaves to us (setup)
        self.phase = phase
        self.compression = compression  # the stage's `Compression` callback, or None (dense training)
        self.log_every_n_steps = max(1, int(log_every_n_steps))
        self.val_metrics = ctr_metrics(auroc_bins)
        self.val_logloss = LogLoss()
        self.test_metrics = ctr_metrics(auroc_bins)
        self.test_logloss = LogLoss()
        # How often the loss is checked for NaN/inf on the host. None: every step on CPU (reading a CPU scalar
        # costs nothing), every 50 steps on an accelerator, where `float(loss)` each step would be a host sync
        # stalling the queue. Between checks a device-side flag accumulates; it is also checked before any
        # checkpoint is written (on_save_checkpoint), so a NaN never reaches a checkpoint.
        self.nan_check_every = nan_check_every
        self._nan_every = 1
        self._finite: torch.Tensor | None = None  # all losses finite since the last host check (device bool)
        self._finite_since = 0  # first step the flag covers
        self._last_loss: torch.Tensor | None = None
        if monitor not in MONITORS:
            raise ValueError(f"config key `eval.monitor` must be one of {sorted(MONITORS)}, got {monitor!r}")
        if embedding_rows not in EMBEDDING_ROWS:
            raise ValueError(f"config key `regularization.embedding_rows` must be one of {EMBEDDING_ROWS}, "
                             f"got {embedding_rows!r}")
        self.monitor = monitor
        # Regularization (FuxiCTR's knobs): (λ_e/2)·||E_r||² on table rows (see `embedding_penalty`), and L2
        # weight decay λ_d on every other parameter (an optimizer group of its own, the tables' decay untouched).
        self.embedding_l2, self.embedding_rows, self.dense_l2 = float(embedding_l2), embedding_rows, float(dense_l2)
        self.max_grad_norm = max_grad_norm  # clip the global gradient norm to this (FuxiCTR: 10); None = off

    @property
    def val_monitor(self) -> str:
        """The metric a best-on-validation checkpoint, early stopping and the plateau decay of this phase follow
        (`eval.monitor`); its direction is `monitor_mode`."""
        return f"{self.phase}/val/{self.monitor}"

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.monitor]

    @property
    def step_model(self) -> nn.Module:
        """What the training and evaluation steps call: `sharded` (the DMP wrapper, DDP around the dense modules)
        while a strategy has set one, else `model`."""
        return self.model if self.sharded is None else self.sharded

    @property
    def hook_model(self) -> nn.Module:
        """The DLRM that trains, as a compression method's hooks get it: `model`, or while tables are sharded
        the DLRM inside the DMP wrapper (`sharded.module`: `model`'s dense modules, the tables looked up where
        their shards live), which a hook can run forward outside the wrapper."""
        return self.model if self.sharded is None else getattr(self.sharded, "module", self.sharded)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.step_model(dense, sparse)

    @property
    def last_loss(self) -> float | None:
        """The last training step's loss (a host read: call it sparingly on an accelerator)."""
        return None if self._last_loss is None else float(self._last_loss)

    def setup(self, stage: str) -> None:
        # Under DDP the sparse-gradient tables stay out of its reducer (it is told before it wraps the module)
        # and are averaged after each backward by `average_gradients`: see distributed.py for why.
        # A strategy that shards the tables (sharded.strategy.TorchrecStrategy) trains and averages them itself.
        strategy = self.trainer.strategy
        if stage == "fit" and isinstance(strategy, DDPStrategy) and self.trainer.world_size > 1 \
                and not getattr(strategy, "shards_tables", False):
            tables = sparse_tables(self.model)
            self._ddp_params_and_buffers_to_ignore = [f"model.{name}" for name in tables]
            self._local_tables = list(tables.values())

    def on_fit_start(self) -> None:
        if self._local_tables:
            broadcast_parameters(self._local_tables)  # what DDP does for the parameters it owns
        every = self.nan_check_every
        self._nan_every = max(1, int(every)) if every is not None else (1 if self.device.type == "cpu" else 50)

    def configure_callbacks(self) -> list:
        return [] if self.compression is None else [self.compression]

    def configure_optimizers(self):
        # Plain SGD (reference DLRM) accepts the sparse gradients of the embedding tables. An optimizer that
        # does not (Adam, SGD with momentum, ...) gets them dense: one optimizer over every parameter with one
        # meaning, which every method works with (group lasso adds a dense gradient to the tables, Taylor
        # reads them, UMEC's prox follows the step). The price is a table-sized gradient and a dense update of
        # every row each step (Adam's moments decay for rows not in the batch): fine for small tables; for
        # Criteo-size ones prefer Adagrad, which keeps them sparse. (SparseAdam for the tables + Adam for the
        # rest was the alternative: it breaks on group lasso's dense penalty gradient on the tables.)
        factory = self.optimizer_factory or torch.optim.SGD
        params = list(self.model.parameters())
        if self.dense_l2 > 0:  # the tables keep the optimizer's own decay; every other parameter gets λ_d
            tables = {id(g.weight) for g in self.model.sparse.groups}
            params = [{"params": [p for p in params if id(p) in tables]},
                      {"params": [p for p in params if id(p) not in tables], "weight_decay": self.dense_l2}]
        optimizer = factory(params, lr=self.lr)
        tables = list(sparse_tables(self.model).values())
        self._densify = [] if accepts_sparse_grads(optimizer, tables) else tables
        if self.embedding_rows == "auto":  # every row where the optimizer updates every row anyway
            self._l2_rows = "all" if self._densify or not self.model.sparse_grad else "touched"
        return optimizer

    def embedding_penalty(self, sparse: torch.Tensor) -> torch.Tensor | None:
        """(λ_e/2)·Σ_r ||E_r||² over table rows r: with `embedding_rows` "touched" the rows this batch looks up,
        each once (its gradient is λ_e·E_r on exactly those rows: sparse tables stay sparse, the cost is
        the batch's, not the tables'); "all" every row of every table (FuxiCTR's rule: a table-sized term and
        dense table gradients every step, for small tables); "auto" (the default) is "all" where the tables get
        dense gradients anyway (Adam, or `model.sparse_grad` false: the term then costs no more than the
        update), else "touched". None when λ_e = 0."""
        if self.embedding_l2 == 0:
            return None
        arch = self.model.sparse
        rows = self.embedding_rows if self.embedding_rows != "auto" else getattr(self, "_l2_rows", "touched")
        if rows == "all":
            total = sum(group.weight.square().sum() for group in arch.groups)
        else:
            ids = sparse.t().index_select(0, arch.feature_ids)  # (F, B), group after group (SparseArch.forward)
            total = sparse.new_zeros((), dtype=torch.float32)
            for group in arch.groups:
                rows = (ids[group.start: group.stop] + group.offsets[:, None]).reshape(-1).unique()
                total = total + F.embedding(rows, group.weight, sparse=group.sparse).square().sum()
        return 0.5 * self.embedding_l2 * total

    def _densify_grads(self) -> None:
        for param in self._densify:
            if param.grad is not None and param.grad.is_sparse:
                param.grad = param.grad.to_dense()

    # ---- training --------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int):
        opt = self.optimizers()
        logits = self.step_model(batch.dense, batch.sparse)
        loss = F.binary_cross_entropy_with_logits(logits, batch.label)
        compression = self.compression
        hook_model = self.hook_model
        penalty = compression.loss(hook_model) if compression is not None else None
        total = loss if penalty is None else loss + penalty
        regularizer = self.embedding_penalty(batch.sparse)
        if regularizer is not None:
            total = total + regularizer
        # A NaN must stop the run: checked here every `_nan_every` steps (every step on CPU: before it reaches
        # the weights), and always before a checkpoint is written.
        self._watch_finite(total.detach())
        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if self._local_tables:
            average_gradients(self._local_tables)
        self._densify_grads()
        if self.max_grad_norm is not None:
            clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        if compression is not None:
            compression.after_backward(hook_model)
        opt.step()
        if compression is not None:
            # η1 of UMEC's prox is `lr` (admm.prox_step=nominal), or the step the optimizer took per group
            # (prox_step=adaptive: UMEC reads the optimizer's preconditioner, `set_optimizer`).
            compression.after_step(hook_model, self.lr)
        self._last_loss = loss.detach()
        if self.global_step % self.log_every_n_steps == 0:
            self.log(f"{self.phase}/train_loss", self._last_loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss.detach()

    def _watch_finite(self, total: torch.Tensor) -> None:
        if self._nan_every == 1:
            value = float(total)
            if not math.isfinite(value):
                raise NonFiniteLossError(self._nan_message(f"{value} at {self._where(self.global_step)}"))
            return
        finite = torch.isfinite(total)
        if self._finite is None:
            self._finite, self._finite_since = finite, self.global_step
        else:
            self._finite = self._finite & finite
        if (self.global_step + 1) % self._nan_every == 0:
            self.check_finite()

    def check_finite(self) -> None:
        """Raise if a loss since the last check was not finite (one host read); reset the flag."""
        if self._finite is None:
            return
        finite, since = bool(self._finite), self._finite_since
        self._finite = None
        if not finite:
            raise NonFiniteLossError(self._nan_message(
                f"non-finite between {self._where(since)} and step {self.global_step} (checked every "
                f"{self._nan_every} steps on {self.device.type})"))

    def _where(self, step: int) -> str:
        return f"{self.phase} step {step} (epoch {self.current_epoch})"

    def _nan_message(self, what: str) -> str:
        duals = ""
        if self.compression is not None:
            shown = self.compression.dual_values()
            if shown:
                duals = "; last dual values seen: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
        return f"training loss became {what}{duals}"

    # ---- evaluation ------------------------------------------------------------------------------
    def _eval_step(self, batch, metrics, logloss) -> None:
        logits = self.step_model(batch.dense, batch.sparse)
        target = batch.label.long()
        metrics.update(torch.sigmoid(logits), target)
        logloss.update(logits, batch.label)

    def _eval_epoch_end(self, split: str, metrics, logloss) -> None:
        values = {f"{self.phase}/{split}/{k}": v for k, v in metrics.compute().items()}
        values[f"{self.phase}/{split}/logloss"] = logloss.compute()
        if split == "val" and self.monitor == "auc_logloss":
            prefix = f"{self.phase}/val/"
            values[f"{prefix}auc_logloss"] = values[f"{prefix}auc"] - values[f"{prefix}logloss"]
        self.log_dict(values, prog_bar=split == "val", sync_dist=False)
        metrics.reset()
        logloss.reset()

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_logloss)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics, self.val_logloss)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_logloss)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics, self.test_logloss)

    def load_weights(self, checkpoint_path) -> None:
        """The weights of a Lightning checkpoint of this module (e.g. the best-on-validation one); a model
        without its tables (`DLRM.holds_tables`) loads the rest (rank 0 holds the tables of record)."""
        self.load_state_dict(read_checkpoint_into(self.model, checkpoint_path)["state_dict"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.check_finite()  # a NaN since the last check stops the run before this checkpoint is written
        # Lets `pretrained=` refuse a checkpoint made for another model or data config.
        checkpoint["dlrm_structure"] = self.model.structure.to_dict()
