"""Image metrics for pose retargeting, with the protocol of PIDM / CFLD / PCDMs on DeepFashion.

- :mod:`~pmf_jax.metrics.ssim_psnr`: SSIM and PSNR in JAX (scikit-image's numbers, checked in the tests).
- :mod:`~pmf_jax.metrics.lpips`: LPIPS, AlexNet (the ``lpips`` package).
- :mod:`~pmf_jax.metrics.fid`: FID statistics and distance; injectable feature network, pytorch-fid Inception in
  production.
- :mod:`~pmf_jax.metrics.clip_score`: CLIP score (torchmetrics) for prompted runs.
- :mod:`~pmf_jax.metrics.availability`: where weights are found; :class:`MetricUnavailable` when they are not.

The torch-based metrics import torch only when constructed; nothing downloads weights.
"""

from pmf_jax.metrics.availability import MetricUnavailable, find_weights, weight_dirs
from pmf_jax.metrics.fid import FeatureExtractor, FeatureStats, frechet_distance
from pmf_jax.metrics.ssim_psnr import psnr, ssim

__all__ = ["FeatureExtractor", "FeatureStats", "MetricUnavailable", "find_weights", "frechet_distance", "psnr",
           "ssim", "weight_dirs"]
