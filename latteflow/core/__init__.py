"""The model itself: config, layers, the cached prompt context, the model, the sampler, checkpoints (imports torch, transformers and latte_kernels only)."""
