"""The PyTorch side: the only place in pmf_jax (with convert code) that imports torch."""
