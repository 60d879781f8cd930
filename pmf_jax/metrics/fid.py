"""FID: feature statistics of image sets and the Fréchet distance between them; the feature network is injectable.

Production features are pytorch-fid's Inception-v3 pool3 (2048-d; the TF FID weights ``pt_inception-2015-12-05``),
the network of GFLA's metric script that PIDM and PCDMs evaluate with: uint8 RGB -> [0, 1] -> bilinear resize to
299x299 -> [-1, 1] inside the network. The weights file is read from a local folder or the torch hub cache
(:mod:`pmf_jax.metrics.availability`); nothing is downloaded.

Any :class:`FeatureExtractor` (a name and a function uint8 ``[B, H, W, 3]`` -> ``[B, D]``) can stand in, e.g. a small
random network in tests. Statistics accumulate in float64 over batches (no need to keep 48k x 2048 features) and can
be saved to / loaded from ``.npz`` so the training-set reference is computed once.

The distance is ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. pytorch-fid's ``calculate_frechet_distance``
takes ``sqrtm`` of the 2048x2048 product (tens of seconds on a CPU); we get the same trace from the eigenvalues of the
symmetric ``S1^(1/2) S2 S1^(1/2)`` (two ``eigh``), which the tests check against pytorch-fid.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Optional, Union
from unittest import mock

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.metrics.availability import MetricUnavailable, find_weights, require_modules

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_FILE


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A feature network for FID.

    Attributes:
      name: identifies the network (and its input handling) in cached statistics; change it when the network changes.
      fn: uint8 ``[B, H, W, 3]`` -> float ``[B, D]``.
      batch_size: images per call.
    """

    name: str
    fn: Callable[[np.ndarray], np.ndarray]
    batch_size: int = 50

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(images), np.float64).reshape(len(images), -1)


def inception_extractor(weights_dir: Optional[os.PathLike] = None, device: Optional[str] = None,
                        batch_size: int = 50) -> FeatureExtractor:
    """pytorch-fid's FID Inception-v3 (pool3, 2048-d) with its weights from a local file.

    Raises:
      MetricUnavailable: torch / pytorch-fid not installed, or the weights file not found.
    """
    require_modules("FID", ("torch", "torchvision", "pytorch_fid"))
    path = find_weights("FID", INCEPTION_FILE, INCEPTION_URL, weights_dir)
    import torch
    from pytorch_fid import inception

    def local_file(url, *args, **kwargs):
        if not url.endswith("/" + INCEPTION_FILE):  # a pytorch-fid that wants other weights: refuse, never fetch
            raise MetricUnavailable("FID", f"this pytorch-fid asks for {url}, not {INCEPTION_FILE}")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MetricUnavailable("FID", f"{path} is not a readable PyTorch checkpoint ({err})") from None

    # pytorch-fid only knows how to fetch its weights by URL; hand it the local file instead.
    with mock.patch.object(inception, "load_state_dict_from_url", local_file):
        try:
            model = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        except RuntimeError as err:  # load_state_dict: missing / mis-shaped keys
            raise MetricUnavailable("FID", f"{path} does not hold the FID Inception weights ({err})") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.eval().to(device)

    def features(images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255.0).to(device)
        with torch.no_grad():
            return model(x)[0].reshape(len(images), -1).cpu().numpy()

    return FeatureExtractor(name="pytorch-fid-inception-v3-pool3", fn=features, batch_size=batch_size)


class FeatureStats:
    """Running mean and covariance of feature vectors (float64 sums; the covariance is the sample one, as np.cov)."""

    def __init__(self, dim: Optional[int] = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features: np.ndarray) -> None:
        """Adds ``[B, D]`` features."""
        f = np.asarray(features, np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(f.shape[1]), np.zeros((f.shape[1], f.shape[1]))
        self.n += len(f)
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise PMFInputError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def save(self, path: Union[str, os.PathLike], **meta) -> Path:
        """Writes ``mu``, ``sigma``, ``n`` and string ``meta`` (e.g. the extractor's name) to an ``.npz``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=self.n, **{k: str(v) for k, v in meta.items()})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureStats":
        """Statistics saved by :meth:`save` (or any npz with ``mu``, ``sigma`` and ``n``)."""
        try:
            with np.load(path) as data:
                mu, sigma, n = data["mu"], data["sigma"], int(data["n"])
        except (OSError, KeyError, ValueError) as err:
            raise PMFInputError(f"FID statistics {str(path)!r} cannot be read ({err})") from None
        stats = cls()
        stats.n, stats.sum = n, mu * n
        stats.outer = sigma * (n - 1) + n * np.outer(mu, mu)
        return stats


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """FID between two sets' statistics (see the module docstring for the formula and why eigh)."""
    mu1, s1, mu2, s2 = a.mu, a.sigma, b.mu, b.sigma
    if mu1.shape != mu2.shape:
        raise PMFInputError(f"FID: feature sizes differ ({mu1.shape[0]} vs {mu2.shape[0]}): different extractors?")
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S1^(1/2), symmetric
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)  # eigenvalues of S1 S2, all >= 0 up to rounding
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
