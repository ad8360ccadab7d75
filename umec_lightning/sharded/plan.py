"""The sharding plan from the config: `trainer.sharding` is one sharding type for every table
(`table_wise`), or a mapping {table name: type} with an optional `default` for the rest
(`{default: table_wise, C3: row_wise}`). Types: table_wise, row_wise, column_wise, table_row_wise,
table_column_wise, data_parallel.

The planner (EmbeddingShardingPlanner on a Topology of the world size and device) then places each table
under the type it is allowed (ParameterConstraints); every rank computes the same plan (collective_plan).

Row-wise and table-row-wise on CPU: torchrec's stock EBC sharder lists them for CUDA only; its row-wise
sharding runs correctly on gloo (tests/sharded/test_module_equality.py: it trains like one unsharded process),
so `EBCSharder` offers on CPU what it offers on CUDA, minus grid sharding.

Column-wise: each table is cut into about `world` column blocks (`column_block`), whatever its width.

Tables (all but data-parallel ones) are trained by fbgemm's fused optimizer, applied in the backward (the
fused-params path of the sharder): EXACT_SGD, or EXACT_ADAGRAD under optim=adagrad (`fused_params`).
Data-parallel tables are plain replicated parameters that the dense optimizer steps.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType

from ..config import ConfigError
from . import FUSABLE_OPTIMIZERS

SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel")
DEFAULT_SHARDING = "table_wise"


def sharding_types(sharding, table_names: list[str], known_names: list[str] | None = None) -> dict[str, str]:
    """{table name: sharding type} for the model's tables `table_names` from `trainer.sharding` (a type, or
    {name: type, default: type}); ConfigError naming the key on an unknown type, or a name that is none of
    `known_names` (the data's sparse features; default `table_names`). A feature compression removed has
    no table any more: its entry is ignored."""
    if sharding is None or isinstance(sharding, str):
        by_name, default = {}, sharding or DEFAULT_SHARDING
    elif isinstance(sharding, Mapping):
        by_name = {str(k): v for k, v in sharding.items() if k != "default"}
        default = sharding.get("default", DEFAULT_SHARDING)
    else:
        raise ConfigError(f"config key `trainer.sharding` must be a sharding type or a mapping {{table: type}}, "
                          f"got {sharding!r}")
    known = list(table_names if known_names is None else known_names)
    unknown = sorted(set(by_name) - set(known))
    if unknown:
        raise ConfigError(f"config key `trainer.sharding`: no table named {', '.join(unknown)} "
                          f"(tables: {', '.join(known)})")
    out = {name: by_name.get(name, default) for name in table_names}
    for name, kind in {**out, "default": default}.items():
        if kind not in SHARDING_TYPES:
            key = "trainer.sharding" if isinstance(sharding, str) or sharding is None else f"trainer.sharding.{name}"
            raise ConfigError(f"config key `{key}` must be one of {', '.join(SHARDING_TYPES)}, got {kind!r}")
    return out


class EBCSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, which on CPU also offers row-wise and table-row-wise sharding."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if compute_device_type != "cpu":
            return super().sharding_types(compute_device_type)
        return super().sharding_types("cpu") + [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]


# The table optimizers fbgemm fuses that are the same update as the torch optimizer the rest trains with
# (torch's sparse path: only the rows a batch looks up move). Adam is not among them: ours gives the tables
# dense gradients (every row's moments decay each step), fbgemm's Adam is the lazy, per-row one.
TABLE_OPTIMIZERS = {torch.optim.SGD: EmbOptimType.EXACT_SGD, torch.optim.Adagrad: EmbOptimType.EXACT_ADAGRAD}


def fused_params(factory, lr: float) -> dict:
    """fbgemm's fused optimizer for the tables, matching the module's optimizer `factory` (None: SGD; a
    `functools.partial` of a torch.optim class from `optim`): exact SGD, or exact Adagrad with its eps
    (torch: sum += g², w -= lr·g / (sqrt(sum) + eps) per looked-up row, accumulators from 0)."""
    cls = getattr(factory, "func", factory) or torch.optim.SGD
    kwargs = getattr(factory, "keywords", {}) or {}
    off = FUSABLE_OPTIMIZERS.get(f"torch.optim.{cls.__name__}")
    if cls not in TABLE_OPTIMIZERS or off is None or any(kwargs.get(k) for k in off):
        raise ValueError(f"trainer=torchrec fuses plain SGD or plain Adagrad into the tables, not {cls.__name__} "
                         f"with {kwargs}")
    params = {"optimizer": TABLE_OPTIMIZERS[cls], "learning_rate": float(lr)}
    if cls is torch.optim.Adagrad:
        params["eps"] = float(kwargs.get("eps", 1e-10))  # torch's default, not fbgemm's 1e-8
    return params


def make_sharder(lr: float, factory=None) -> EBCSharder:
    """The EBC sharder whose fused kernels train the tables in the backward, with `fused_params`."""
    return EBCSharder(fused_params=fused_params(factory, lr))


COLUMN_TYPES = ("column_wise", "table_column_wise")


def column_block(width: int, world: int) -> int:
    """The smallest column shard a column-wise table of (stored) `width` may be cut into on `world` ranks:
    width / world, so that it is split over the ranks (torchrec's default, 128 columns, never splits a
    narrower table). torchrec rounds it up to a divisor of the width divisible by 4, or keeps one shard."""
    return max(4, -(-width // world))


def make_plan(module: nn.Module, sharder: EBCSharder, types: dict[str, str], device: torch.device,
              group=None) -> ShardingPlan:
    """The plan of `module`'s EBC tables (by name) under `types`, the same on every rank of `group`."""
    group = group or dist.GroupMember.WORLD
    world = dist.get_world_size(group)
    topology = Topology(world_size=world, local_world_size=world, compute_device=device.type)
    widths = {c.name: c.embedding_dim for c in module.sparse.ebc.embedding_bag_configs()}
    constraints = {name: ParameterConstraints(sharding_types=[ShardingType[kind.upper()].value],
                                              min_partition=column_block(widths[name], world)
                                              if kind in COLUMN_TYPES else None)
                   for name, kind in types.items()}
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(module, [sharder], group)
