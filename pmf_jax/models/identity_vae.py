"""A parameter-free "autoencoder" for pixel-space models (tiny demo/test runs where no pretrained VAE exists).

``patch_size`` p folds p×p pixel patches into channels (space-to-depth), losslessly: [B, H, W, 3] ⇄
[B, H/p, W/p, 3·p²]. p = 1 is the identity. It has AutoencoderKL's interface (``encode`` → (mean, logvar),
``decode``, ``scaling_factor``, ``latent_channels``, ``downscale_factor``) so pipelines and the trainer treat both alike.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


def patch_size_for_channels(latent_channels: int, channels: int = 3) -> Optional[int]:
    """p with ``latent_channels == channels·p²`` (a pixel-space UNet's channels, e.g. 48 -> 4), else None."""
    if latent_channels <= 0 or latent_channels % channels:
        return None
    p = math.isqrt(latent_channels // channels)
    return p if channels * p * p == latent_channels else None


class IdentityAutoencoder(nn.Module):
    patch_size: int = 1
    channels: int = 3
    scaling_factor: float = 1.0
    shift_factor: float = 0.0

    @property
    def latent_channels(self) -> int:
        return self.channels * self.patch_size**2

    @property
    def downscale_factor(self) -> int:
        return self.patch_size

    def encode(self, x):
        """x [B, H, W, C] -> (mean [B, H/p, W/p, C·p²], logvar = zeros)."""
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        z = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // p, w // p, c * p * p)
        return z, jnp.zeros_like(z)

    def decode(self, z):
        """z [B, h, w, C·p²] -> [B, h·p, w·p, C]."""
        b, h, w, _ = z.shape
        p, c = self.patch_size, self.channels
        return z.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * p, w * p, c)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])
