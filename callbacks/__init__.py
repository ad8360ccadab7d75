"""Lightning callbacks of umec-lightning (installed as `umec_lightning.callbacks`): the compression of a compress
stage (hooks, logging, state, extraction), the finetune phase, throughput, the learning-rate plateau decay,
simulated interruption."""
