"""synthetic_pairs: generated pose-transfer pairs (same identity, two poses); no download, deterministic from a seed.

Identity ``i`` of a split is drawn from ``numpy.random.default_rng([seed, split_offset + i])``: its appearance, then
``pairs_per_identity`` (source pose, target pose) pairs. Train identities use offsets from 0, test identities from
1,000,000, so a test person never appears in train and every example is reproducible on its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

import pairs_common
from . import figures

TEST_ID_OFFSET = 1_000_000


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Image size and how many identities / pairs each split has."""

    size: int = 64
    train_identities: int = 1000
    test_identities: int = 100
    pairs_per_identity: int = 4
    seed: int = 0


def _config(name: str, size: int, **kwargs) -> SyntheticConfig:
    return SyntheticConfig(name=name, size=size, description=f"{size}x{size} figures", **kwargs)


class Builder(pairs_common.PairsBuilder):
    """Synthetic people drawn from 18 keypoints with a per-identity look (see figures.py)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        _config("64", 64),
        _config("128", 128),
        _config("256", 256),
        # For tests: seconds to build.
        _config("tiny", 64, train_identities=4, test_identities=2, pairs_per_identity=2),
    ]
    DEFAULT_CONFIG_NAME = "64"

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            features=pairs_common.pair_features(size, size, encoding_format="png"),
            homepage="https://github.com/pmf-jax/pmf_jax/tree/main/data/synthetic_pairs",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config = self.builder_config
        return {
            "train": self._generate_examples(range(config.train_identities)),
            "test": self._generate_examples(range(TEST_ID_OFFSET, TEST_ID_OFFSET + config.test_identities)),
        }

    def _generate_examples(self, identities):
        config = self.builder_config
        for identity in identities:
            yield from generate_identity(identity, config.size, config.pairs_per_identity, config.seed)


def generate_identity(identity: int, size: int, num_pairs: int, seed: int):
    """Yields ``(key, example)`` for one identity's pairs; examples hold uint8 images and float32 ``[18, 3]``."""
    rng = np.random.default_rng([seed, identity])
    appearance = figures.sample_appearance(rng)
    person_id = f"id{identity:07d}"
    for k in range(num_pairs):
        source_keypoints, target_keypoints = figures.sample_pose(rng, size), figures.sample_pose(rng, size)
        yield f"{person_id}_{k:03d}", {
            "source_image": figures.draw_figure(source_keypoints, appearance, size),
            "target_image": figures.draw_figure(target_keypoints, appearance, size),
            "source_keypoints": source_keypoints,
            "target_keypoints": target_keypoints,
            "person_id": person_id,
            "source_name": f"{person_id}_{k:03d}_source.png",
            "target_name": f"{person_id}_{k:03d}_target.png",
        }
