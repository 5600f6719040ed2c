"""Data and latent spaces: the digits set, the pixel and DC-AE autoencoders, image grids (imports latteflow.core)."""
