"""PoseMaster Fusion (PMF) in JAX/Flax: diffusion-based 2D human pose retargeting."""

__version__ = "0.1.0"
