"""pyckpt: crash-safe snapshots for torch.distributed training."""
