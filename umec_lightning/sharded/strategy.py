"""`TorchrecStrategy`: Lightning's DDP strategy with the DLRM's embedding tables sharded by torchrec.

How DMP sits under Lightning. There is no official Lightning strategy for DistributedModelParallel, so this
subclasses DDPStrategy (process launch, gloo/NCCL process group, barriers, broadcasts and rank-zero logic
unchanged) and replaces what it does with the model:

  * the tables of record: rank 0's plain DLRM alone holds the tables whole (host memory); every other
    rank's has `meta` tables (`DLRM.holds_tables`: built so by the run, or freed here at setup), so W ranks
    hold the tables once, plus each its shards.
  * setup (every fit, validate and test): the LightningModule is *not* wrapped in DDP. Its plain DLRM
    (`module.model`) stays the run's model of record; the strategy builds a shell of it whose sparse arch is
    a torchrec EmbeddingBagCollection and whose every other module is the plain model's own
    (`ebc.ebc_shell`), plans it (`plan.make_plan`), wraps it in DistributedModelParallel (tables sharded by
    the plan, the rest data-parallel in DMP's own DDP), loads rank 0's tables into every rank's local
    shards (broadcast in blocks, `tables.load_tables`) and sets it as `module.sharded`, which the module's
    steps run (`CTRModule.step_model`) for the duration of the call. The training step is the module's own
    (manual optimization, unchanged).
  * compression: a method's group sets live on dense parameters only (the top MLP's input columns, the
    neurons, the dimension gate: `compression/groups.py`), which are the plain model's and DMP's at once,
    so its hooks, prox and gates run unchanged on every rank (replicated, like DDP) and no step reads a
    table. A hook that runs the model (held-out feature scores) gets the shell (`CTRModule.hook_model`), whose
    forward looks the tables up where their shards live.
  * train end: the shards are gathered into rank 0's plain tables (summed onto rank 0 in blocks,
    `tables.gather_tables`), and `module.sharded` is dropped (teardown drops it after validate/test, or an
    exception). So after any Trainer call rank 0 holds an ordinary DLRM, trained, and the others the same
    without tables. Extraction runs on rank 0 alone (`method.finish_on_rank_zero`: calibration on every
    rank's batches, the decision, the surgery), every rank gets the smaller model's structure and dense
    weights, and the next Trainer call shards it under a new plan (a removed feature has no table, a narrowed
    one smaller shards). Rank 0 times and saves the models.
  * memory: each setup records the bytes of every rank's local table shards (`table_memory`, a collective)
    under the module's phase in `record`, which the run writes to summary.json.
  * optimizers: tables trained by fbgemm's fused counterpart of the module's optimizer (exact SGD or exact
    Adagrad, `plan.fused_params`) at the module's lr, applied inside the backward (the sharder's fused
    params; data-parallel tables excepted); every other parameter (data-parallel tables included) by the
    module's dense optimizer (`optim`). Lightning sees one torchrec CombinedOptimizer of the two, so
    `opt.zero_grad()` / `opt.step()` in the training step cover both.
  * checkpoints: `checkpoint.py`'s format (a Lightning file from rank 0 with the dense weights and the dense
    optimizer's state, one table-shard file per rank with its table shards and fused optimizer state).
    Loading (resume) assembles the tables into rank 0's plain DLRM before setup reshards it, and the fused
    state into the new shards after it (from rank 0, like the tables), so the plan may change on resume;
    the other ranks read no table.

Gradients: DMP's output dist averages the tables' gradients over ranks as DDP averages the dense ones, so a
step on W ranks of batch B is a step on one batch of W·B (the datamodule gives rank r batches r, r+W, ...).
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from ..io import save_torch
from ..models import DLRM, SparseArch
from .checkpoint import OPTIMIZER_STATE_KEY, SHARDED_KEY, read_checkpoint_into, shard_path
from .ebc import ebc_shell
from .plan import make_plan, make_sharder, sharding_types
from .tables import (
    dense_state,
    gather_tables,
    load_optimizer_states,
    load_tables,
    local_pieces,
    optimizer_pieces,
    plan_tables,
    table_memory,
    table_name,
)


def _whole_tables(plain: DLRM) -> dict[str, torch.Tensor] | None:
    """The plain DLRM's tables {name: (rows, d)} on rank 0, which holds the tables of record; None elsewhere."""
    if dist.get_rank() != 0:
        return None
    return {name: view.weight for name, view in plain.sparse.tables.items()}


@contextmanager
def tables_hidden(module: torch.nn.Module):
    """`module`'s DLRM tables out of sight of `.to()` / `.cpu()` for the duration: they stay in host memory
    (rank 0's tables of record) or `meta` (every other rank's), wherever the rest of the module goes."""
    plain = getattr(module, "model", None)
    if not isinstance(getattr(plain, "sparse", None), SparseArch):  # not a model of a family (`models.family`)
        yield
        return
    groups = plain.sparse.groups
    plain.sparse._modules["groups"] = torch.nn.ModuleList()
    try:
        yield
    finally:
        plain.sparse._modules["groups"] = groups


class QuietKernelLogs(logging.Filter):
    """fbgemm logs each table-batched kernel's full arguments at INFO on the root logger (long lines, many a
    run, that would bury train.log): those stay out; its warnings and errors pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not str(record.msg).startswith("[TBE=")


def quiet_kernel_logs() -> None:
    root = logging.getLogger()
    if not any(isinstance(f, QuietKernelLogs) for f in root.filters):
        root.addFilter(QuietKernelLogs())


def shard(plain: DLRM, sharding, lr: float, device: torch.device, factory=None) -> DistributedModelParallel:
    """`plain` as a DMP: its tables sharded by the plan of `sharding`, loaded with rank 0's `plain` tables (a
    collective), trained by the fused counterpart of the optimizer `factory` (None: SGD) at `lr`."""
    shell = ebc_shell(plain)
    sharder = make_sharder(lr, factory)
    s = plain.structure
    plan = make_plan(shell, sharder, sharding_types(sharding, s.feature_names, s.sparse_names), device)
    dmp = DistributedModelParallel(shell, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=device, plan=plan, sharders=[sharder])
    load_tables(dmp, _whole_tables(plain))
    return dmp


class TorchrecStrategy(DDPStrategy):
    """See the module docstring. `sharding`: `trainer.sharding` (a type, or {table: type, default: type});
    `record`: a dict that gets each phase's `table_memory`."""

    shards_tables = True  # CTRModule: leave the tables to this strategy (no table averaging of its own)

    def __init__(self, sharding=None, record: dict | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.sharding = sharding
        self.record = record  # {phase: table_memory(...)} of every setup, when given
        quiet_kernel_logs()
        self._plain: DLRM | None = None
        self._dmp: DistributedModelParallel | None = None
        self._dense_optimizer: torch.optim.Optimizer | None = None

    # ---- the model ----------------------------------------------------------------------------------
    def model_to_device(self) -> None:
        """The module to the root device, except the plain DLRM's tables: rank 0's tables of record stay in
        host memory (the device holds only shards), the other ranks' are `meta`."""
        with tables_hidden(self.lightning_module):
            super().model_to_device()

    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        self._plain = module.model
        if self.global_rank == 0 and not self._plain.holds_tables:
            raise RuntimeError("trainer=torchrec: rank 0 must hold the tables of record (its DLRM has meta tables)")
        if self.global_rank != 0:
            self._plain.release_tables()  # they live as shards only; rank 0's are the ones of record
        self.model_to_device()
        self._dmp = shard(self._plain, self.sharding, module.lr, self.root_device, module.optimizer_factory)
        module.sharded = self._dmp
        if self.record is not None:
            self.record[module.phase] = table_memory(self._dmp)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)

    def on_train_end(self) -> None:
        """Training finished on every rank: the plain DLRM gets the trained weights (a collective)."""
        super().on_train_end()
        self.copy_into_plain()
        self.lightning_module.sharded = None  # what runs after the fit (best weights, extraction) sees the plain DLRM

    def copy_into_plain(self) -> None:
        """The trained tables into rank 0's plain DLRM (its dense weights are the sharded model's own, on
        every rank): a collective."""
        gather_tables(self._dmp, _whole_tables(self._plain))

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None:
            module.sharded = None
        self._plain, self._dmp, self._dense_optimizer = None, None, None
        self.optimizers = []
        gc.collect()  # drop the DMP's DDP reducers (and their hooks) now
        with tables_hidden(module):  # Strategy.teardown moves the module to the CPU
            super().teardown()

    # ---- optimizers ---------------------------------------------------------------------------------
    def setup_optimizers(self, trainer) -> None:
        module, dmp = self.lightning_module, self._dmp
        # Every table but the data-parallel ones is the fused optimizer's: named_parameters also lists the
        # tables whose shards live on other ranks (empty here), which must not reach the dense optimizer
        # either (its parameter list would follow the plan's placement, which may change on resume).
        sharded = {name for name, p in plan_tables(dmp).items() if p.sharding_type != ShardingType.DATA_PARALLEL.value}
        dense = {n: p for n, p in dmp.named_parameters() if table_name(n) not in sharded}
        factory = module.optimizer_factory or torch.optim.SGD
        wrapper = KeyedOptimizerWrapper(dense, lambda params: factory(params, lr=module.lr))
        self._dense_optimizer = wrapper._optimizer
        self.optimizers = [CombinedOptimizer([("tables", dmp.fused_optimizer), ("dense", wrapper)])]
        self.lr_scheduler_configs = []
        module._densify = []  # the fused kernels take the tables' gradients; the dense ones are dense

    def optimizer_state(self, optimizer) -> dict:
        # The fused optimizer's state (Adagrad's accumulators) goes to the table-shard files (save_checkpoint).
        return {"dense": self._dense_optimizer.state_dict()}

    def load_optimizer_state_dict(self, checkpoint) -> None:
        self._dense_optimizer.load_state_dict(checkpoint["optimizer_states"][0]["dense"])
        load_optimizer_states(self._dmp, checkpoint.get(OPTIMIZER_STATE_KEY))  # rank 0's; a collective

    # ---- checkpoints --------------------------------------------------------------------------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        module = self.lightning_module
        if self._dmp is None or module.sharded is not self._dmp:
            return super().lightning_module_state_dict()
        state = {k: v for k, v in module.state_dict().items() if not k.startswith(("model.", "sharded."))}
        state.update({f"model.{k}": v for k, v in dense_state(self._dmp).items()})
        return state

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None) -> None:
        if self._dmp is None or self.lightning_module.sharded is not self._dmp:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        pieces, shapes = local_pieces(self._dmp)
        states, state_shapes = optimizer_pieces(self._dmp)
        pieces.update(states)
        world, rank = self.world_size, self.global_rank
        checkpoint[SHARDED_KEY] = {"world_size": world, "shapes": shapes, "optimizer_shapes": state_shapes}
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        save_torch(shard_path(filepath, rank, world), pieces)  # atomic, as the main file (checkpoint_io.py)
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        shard_path(filepath, self.global_rank, self.world_size).unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        # Before setup (restore_checkpoint_after_setup is False): rank 0's plain DLRM gets the tables
        # assembled into its own, the other ranks read none (their tables are meta placeholders).
        plain = self.lightning_module.model
        if self.global_rank != 0:
            plain.release_tables()
        return read_checkpoint_into(plain, checkpoint_path)
