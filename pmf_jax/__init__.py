"""PoseMaster Fusion (PMF) in JAX/Flax: diffusion-based 2D human pose retargeting."""

__version__ = "0.1.0"

from pmf_jax import storage as _storage  # noqa: F401  (gs:// client settings before any URL is opened)
