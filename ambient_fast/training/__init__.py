"""Training: the typed configuration, the trainer and its state, parallelism (torch.distributed,
FSDP2 / DDP, compile), the run directory and what a run reports."""
