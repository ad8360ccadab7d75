"""Lightning callbacks of umec-lightning (installed as `umec_lightning.callbacks`): pruning extraction, the
finetune phase, sparsity logging, throughput, simulated interruption."""
