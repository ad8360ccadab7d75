"""DLRM training with the embedding tables sharded by torchrec's DistributedModelParallel (`trainer=torchrec`).

    ebc.py         our SparseArch as a torchrec EmbeddingBagCollection (same per-feature outputs)
    plan.py        sharding types from the config -> planner constraints, the sharder, the plan
    tables.py      the sharded tables to and from whole tensors: load, gather, checkpoint pieces, memory per rank
    strategy.py    the Lightning strategy that shards the model under DMP, builds the optimizers, checkpoints
    checkpoint.py  the checkpoint format (a main file plus one table-shard file per rank), torch only

Only checkpoint.py and this file import without torchrec installed (the module and the stages read
checkpoints with it).

The tables of record. Under trainer=torchrec rank 0 alone holds the DLRM's tables whole (in host memory):
the plain model every stage hands on, what extraction slices, what `compressed.pt` stores. Every other
rank's DLRM has `meta` tables (`DLRM.holds_tables` False: shapes, no memory); its tables exist only as its
shards, loaded from rank 0 and gathered back to it in blocks (`tables.py`). So W ranks on one host hold the
tables once plus their shards, not W times.
"""

import os

# The torch optimizers whose update fbgemm's fused table kernels make exactly (torch's sparse path: only the
# looked-up rows move), with the arguments that must stay off for that. trainer=torchrec accepts these alone:
# `run.check_torchrec` reads the config against it, `plan.fused_params` the optimizer factory.
FUSABLE_OPTIMIZERS = {"torch.optim.SGD": ("momentum", "weight_decay", "nesterov", "dampening"),
                      "torch.optim.Adagrad": ("weight_decay", "lr_decay", "initial_accumulator_value")}


def holds_tables_of_record(strategy: str) -> bool:
    """Whether this process should build its DLRM with tables, before any process group exists: always, but
    under trainer=torchrec in a process the launcher started as another rank than 0 (Lightning's launcher
    and torchrun set LOCAL_RANK / NODE_RANK / RANK in the ranks they start; rank 0 is the one they are all
    0 or unset in). Where no such variable tells (e.g. SLURM's own launch) a process builds them and the
    strategy frees them at its first setup on any rank but 0."""
    if strategy != "torchrec":
        return True
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))
