"""DLRM training with the embedding tables sharded by torchrec's DistributedModelParallel (`trainer=torchrec`).

    ebc.py         our SparseArch as a torchrec EmbeddingBagCollection (same per-feature outputs)
    plan.py        sharding types from the config -> planner constraints, the sharder, the plan
    tables.py      the sharded tables to and from whole tensors: load, gather, checkpoint pieces, memory per rank
    strategy.py    the Lightning strategy that shards the model under DMP, builds the optimizers, checkpoints
    checkpoint.py  the checkpoint format (a main file plus one table-shard file per rank), torch only

Only checkpoint.py imports without torchrec installed (the module and the stages read checkpoints with it).
"""

# The torch optimizers whose update fbgemm's fused table kernels make exactly (torch's sparse path: only the
# looked-up rows move), with the arguments that must stay off for that. trainer=torchrec accepts these alone:
# `run.check_torchrec` reads the config against it, `plan.fused_params` the optimizer factory.
FUSABLE_OPTIMIZERS = {"torch.optim.SGD": ("momentum", "weight_decay", "nesterov", "dampening"),
                      "torch.optim.Adagrad": ("weight_decay", "lr_decay", "initial_accumulator_value")}
