"""Training: the single-process loop and its DDP / FSDP2 form under torchrun (imports core, distributed, text, data)."""
