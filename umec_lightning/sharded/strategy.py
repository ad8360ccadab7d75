"""`TorchrecStrategy`: Lightning's DDP strategy with the DLRM's embedding tables sharded by torchrec.

How DMP sits under Lightning. There is no official Lightning strategy for DistributedModelParallel, so this
subclasses DDPStrategy (process launch, gloo/NCCL process group, barriers, broadcasts and rank-zero logic
unchanged) and replaces what it does with the model:

  * setup (every fit, validate and test): the LightningModule is *not* wrapped in DDP. Its plain DLRM
    (`module.model`) stays the run's model of record; the strategy builds a copy whose sparse arch is a
    torchrec EmbeddingBagCollection (`ebc.ebc_shell`), plans it (`plan.make_plan`), wraps it in
    DistributedModelParallel (tables sharded by the plan, the rest data-parallel in DMP's own DDP), copies
    the plain model's table weights into its local shards and sets it as `module.sharded`, which the
    module's steps run (`CTRModule.net`) for the duration of the call. The training step is the module's
    own (manual optimization, unchanged).
  * train end: the shards are gathered (ShardedTensor.gather to rank 0, broadcast) and the dense weights
    copied back into the plain DLRM on every rank, and `module.sharded` is dropped (teardown drops it after
    validate/test, or an exception). So after any Trainer call the run holds an ordinary DLRM, trained
    (summary, latency, export work as before).
  * optimizers: tables trained by fbgemm's fused exact SGD at the module's lr, applied inside the backward
    (the sharder's fused params; data-parallel tables excepted); every other parameter (data-parallel
    tables included) by the module's dense optimizer (`optim`). Lightning sees one torchrec
    CombinedOptimizer of the two, so `opt.zero_grad()` / `opt.step()` in the training step cover both.
  * checkpoints: `checkpoint.py`'s format (a Lightning file from rank 0 with the dense weights and the dense
    optimizer's state, one table-shard file per rank). The fused SGD has no state to save. Loading (resume)
    assembles the tables into the plain DLRM before setup reshards it, so the plan may change on resume.

Gradients: DMP's output dist averages the tables' gradients over ranks as DDP averages the dense ones, so a
step on W ranks of batch B is a step on one batch of W·B (the datamodule gives rank r batches r, r+W, ...).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.utilities.optimizer import _optimizers_to_device
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from ..models import DLRM
from .checkpoint import SHARDED_KEY, read_checkpoint, shard_path
from .ebc import ebc_shell
from .plan import make_plan, make_sharder, sharding_types

_TABLES = "sparse.ebc.embedding_bags."  # the EBC's tables in the sharded model's state dict


def _table_name(key: str) -> str | None:
    return key[len(_TABLES):].split(".")[0] if key.startswith(_TABLES) else None


def shard(plain: DLRM, sharding, lr: float, device: torch.device) -> DistributedModelParallel:
    """`plain` as a DMP: its tables sharded by the plan of `sharding`, loaded with `plain`'s weights."""
    shell = ebc_shell(plain)
    sharder = make_sharder(lr)
    plan = make_plan(shell, sharder, sharding_types(sharding, plain.structure.feature_names), device)
    dmp = DistributedModelParallel(shell, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                   device=device, plan=plan, sharders=[sharder])
    load_tables(dmp, {name: view.weight for name, view in plain.sparse.tables.items()})
    return dmp


def load_tables(dmp: DistributedModelParallel, tables: dict[str, torch.Tensor]) -> None:
    """Copy whole tables {name: (rows, dim)} into `dmp`'s local shards (on CPU DMP does not copy them)."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            name = _table_name(key)
            if name is None:
                continue
            full = tables[name]
            if isinstance(value, ShardedTensor):
                for s in value.local_shards():
                    where = tuple(slice(o, o + n) for o, n in zip(s.metadata.shard_offsets, s.metadata.shard_sizes))
                    s.tensor.copy_(full[where])
            else:  # data-parallel: a replicated table
                value.copy_(full)


def local_pieces(dmp: DistributedModelParallel) -> tuple[dict[str, list], dict[str, list[int]]]:
    """This rank's {table name: [(offsets, tensor)]} and every table's full shape (data-parallel tables:
    the whole table, from rank 0 only)."""
    pieces, shapes = {}, {}
    for key, value in dmp.state_dict().items():
        name = _table_name(key)
        if name is None:
            continue
        shapes[name] = list(value.size())
        if isinstance(value, ShardedTensor):
            pieces[name] = [(list(s.metadata.shard_offsets), s.tensor.detach().clone())
                            for s in value.local_shards()]
        elif dist.get_rank() == 0:
            pieces[name] = [([0] * value.dim(), value.detach().clone())]
    return pieces, shapes


def gather_tables(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Every table whole, on every rank (a collective)."""
    out = {}
    for key, value in dmp.state_dict().items():
        name = _table_name(key)
        if name is None:
            continue
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=dmp.device)
            value.gather(dst=0, out=full if dist.get_rank() == 0 else None)
            dist.broadcast(full, src=0)
            out[name] = full
        else:
            out[name] = value.detach().clone()
    return out


def dense_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The sharded model's weights other than its sharded tables, under the plain DLRM's names."""
    return {k: v for k, v in dmp.state_dict().items() if _table_name(k) is None}


class TorchrecStrategy(DDPStrategy):
    """See the module docstring. `sharding`: `trainer.sharding` (a type, or {table: type, default: type})."""

    shards_tables = True  # CTRModule: leave the tables to this strategy (no table averaging of its own)

    def __init__(self, sharding=None, **kwargs: Any):
        super().__init__(**kwargs)
        self.sharding = sharding
        self._plain: DLRM | None = None
        self._dmp: DistributedModelParallel | None = None
        self._dense_optimizer: torch.optim.Optimizer | None = None

    # ---- the model ----------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self.model_to_device()
        module = self.lightning_module
        self._plain = module.model
        self._dmp = shard(self._plain, self.sharding, module.lr, self.root_device)
        module.sharded = self._dmp
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
        self.lightning_module.sharded = None  # on_fit_end callbacks (best weights) see the plain DLRM

    def copy_into_plain(self) -> None:
        plain, dmp = self._plain, self._dmp
        tables = gather_tables(dmp)
        with torch.no_grad():
            for name, table in tables.items():
                plain.sparse.tables[name].weight.copy_(table.to(plain.sparse.tables[name].weight.device))
        plain.load_state_dict(dense_state(dmp), strict=False)

    def teardown(self) -> None:
        module = self.lightning_module
        if module is not None:
            module.sharded = None
        self._plain, self._dmp, self._dense_optimizer = None, None, None
        self.optimizers = []
        gc.collect()  # drop the DMP's DDP reducers (and their hooks) now
        super().teardown()

    # ---- optimizers ---------------------------------------------------------------------------------
    def setup_optimizers(self, trainer) -> None:
        module, dmp = self.lightning_module, self._dmp
        fused = set(dmp.fused_optimizer.params)
        dense = {n: p for n, p in dmp.named_parameters() if n not in fused}
        factory = module.optimizer_factory or torch.optim.SGD
        wrapper = KeyedOptimizerWrapper(dense, lambda params: factory(params, lr=module.lr))
        self._dense_optimizer = wrapper._optimizer
        self.optimizers = [CombinedOptimizer([("tables", dmp.fused_optimizer), ("dense", wrapper)])]
        self.lr_scheduler_configs = []
        module._densify = []  # the fused kernels take the tables' gradients; the dense ones are dense

    def optimizer_state(self, optimizer) -> dict:
        return {"dense": self._dense_optimizer.state_dict()}  # the fused exact SGD has no state

    def load_optimizer_state_dict(self, checkpoint) -> None:
        self._dense_optimizer.load_state_dict(checkpoint["optimizer_states"][0]["dense"])

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
        world, rank = self.world_size, self.global_rank
        checkpoint[SHARDED_KEY] = {"world_size": world, "shapes": shapes}
        Path(filepath).parent.mkdir(parents=True, exist_ok=True)
        torch.save(pieces, shard_path(filepath, rank, world))
        super().save_checkpoint(checkpoint, filepath, storage_options)  # rank 0

    def remove_checkpoint(self, filepath) -> None:
        super().remove_checkpoint(filepath)
        shard_path(filepath, self.global_rank, self.world_size).unlink(missing_ok=True)

    def load_checkpoint(self, checkpoint_path, weights_only=None) -> dict[str, Any]:
        # Before setup (restore_checkpoint_after_setup is False): the plain DLRM loads the assembled tables.
        return read_checkpoint(checkpoint_path)
