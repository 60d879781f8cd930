"""grain input pipelines over the pose-pair TFDS builders in data/ (shared by training and evaluation).

Reading is random access into the builders' array_record files (``tfds`` data sources) driven by a grain
``DataLoader``: global shuffle from a seed, per-host sharding, augmentation, OpenPose skeleton rendering, batching,
optional worker processes, and an iterator state that checkpoints and restores the position exactly. No tf.data.

    loader = make_loader("synthetic_pairs", "train", data_dir, batch_size=8, resolution=64, config="64")
    it = iter(loader)
    batch = next(it)            # dict of numpy arrays, see make_loader
    state = it.get_state()      # bytes; it.set_state(state) on a fresh iterator resumes at the next batch

**A data_dir on a bucket** (``gs://bucket/tfds``): array_record's reader opens local files only (it cannot read
``gs://``), so the prepared files of the one dataset read, ``<data_dir>/<name>/<config>`` (TFDS's layout
``data_dir/name/config/version/...``), are staged with :func:`pmf_jax.storage.local_copy` into the storage cache
(``$PMF_STORAGE_CACHE`` or ``~/.cache/pmf_jax/storage/gs/<bucket>/<path>``, with a progress bar, reused while the
objects are unchanged) and the cache folder is used as the data_dir (:func:`local_data_dir`; a line on stderr says
so). Building (:func:`build`) into a bucket is refused: prepare locally, then copy the folder.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path

import cv2
import grain
import jax
import numpy as np
from absl import flags as absl_flags

from pmf_jax.batch_sampler import slice_batches
from pmf_jax.errors import PMFInputError
from pmf_jax.pose.keypoints import affine_keypoints, flip_keypoints
from pmf_jax.pose.render import line_widths_for, render_pose
from pmf_jax.progress import tfds_bars
from pmf_jax.runtime import BUILDERS_DIR

# Dataset name -> builder module, importable with BUILDERS_DIR on sys.path (`tfds build data/<name>` imports the same
# module name, so both register one class). Entry points put it there (pmf_jax.runtime.setup).
DATASETS = {
    "deepfashion_pairs": "deepfashion_pairs.deepfashion_pairs_dataset_builder",
    "tiktok_pairs": "tiktok_pairs.tiktok_pairs_dataset_builder",
    "synthetic_pairs": "synthetic_pairs.synthetic_pairs_dataset_builder",
}
SETUP_HINT = "call pmf_jax.runtime.setup() first (the pmf and python -m train entry points do)"

CROP_SCALE = (0.9, 1.0)  # side length of the random crop, as a fraction of the stored image's
FLIP_PROB = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------
def builder_class(name: str):
    """The TFDS builder class of a dataset in DATASETS (imported from BUILDERS_DIR, which must be on ``sys.path``:
    :func:`pmf_jax.runtime.setup`)."""
    if name not in DATASETS:
        raise PMFInputError(f"dataset {name!r} is unknown; known datasets: {', '.join(DATASETS)}")
    if not (BUILDERS_DIR / name).is_dir():
        raise PMFInputError(f"dataset {name!r}: builder folder {BUILDERS_DIR / name} not found (run from a checkout)")
    try:
        return importlib.import_module(DATASETS[name]).Builder
    except ModuleNotFoundError as err:
        if err.name not in (name, "pairs_common"):
            raise
        message = f"dataset {name!r}: the builders in {BUILDERS_DIR} are not importable; {SETUP_HINT}"
        raise PMFInputError(message) from None


def local_data_dir(name: str, data_dir, config=None, cls=None):
    """``data_dir`` itself when local; for a URL, the local cache folder holding a copy of
    ``<data_dir>/<name>/<config>`` (``<name>`` whole when the config is not known), used as the data_dir (module
    docstring). Raises PMFInputError for an unreachable server, a missing bucket or dataset, a permission error."""
    from pmf_jax import storage

    if data_dir is None or not storage.is_url(data_dir):
        return data_dir
    config_name = getattr(config, "name", config)
    if config_name is None and cls is not None and cls.BUILDER_CONFIGS:
        config_name = cls.DEFAULT_BUILDER_CONFIG_NAME or cls.BUILDER_CONFIGS[0].name
    remote = storage.as_path(data_dir) / name
    if config_name:
        remote = remote / config_name
    local = storage.local_copy(remote, desc=f"stage {remote}")
    root = local.parent.parent if config_name else local.parent
    print(f"pmf_jax: TFDS data_dir {os.fspath(data_dir)}: array_record reads local files only; {name}/"
          f"{config_name or ''} staged in {root} (reused while the bucket's files are unchanged)", file=sys.stderr,
          flush=True)
    return root


def builder(name: str, data_dir: str | Path, config=None, **builder_kwargs):
    """A TFDS builder reading/writing ``data_dir/<name>/<config>/<version>`` in array_record format. A URL
    ``data_dir`` is read from a local copy (module docstring: :func:`local_data_dir`).

    ``config`` is a config name or a BuilderConfig object (a custom config, e.g. other TikTok test videos). A name
    the builder class does not define (a custom config built before), or any name where the builder code is not
    available (an installed package without data/), is opened from the prepared files.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import read_only_builder

    if data_dir is None:  # the TFDS default folder (~/tensorflow_datasets or $TFDS_DATA_DIR)
        from tensorflow_datasets.core import constants

        data_dir = constants.DATA_DIR
    try:
        cls = builder_class(name)
    except PMFInputError:
        if name not in DATASETS:
            raise
        cls = None
    data_dir = local_data_dir(name, data_dir, config, cls)
    if cls is not None and not (isinstance(config, str) and config not in cls.builder_configs):
        return cls(data_dir=str(data_dir), config=config, **builder_kwargs)
    try:
        return read_only_builder.builder_from_files(name, config=config, data_dir=str(data_dir))
    except tfds.core.registered.DatasetNotFoundError:
        known = f"; configs: {', '.join(cls.builder_configs)}" if cls is not None else ""
        raise PMFInputError(
            f"dataset {name}/{config} is not built in {data_dir}{known}; run "
            f"`tfds build data/{name} --config CONFIG --data_dir {data_dir}` (see data/{name}/README.md)"
        ) from None


def build(name: str, data_dir: str | Path, config=None, manual_dir: str | Path | None = None, **builder_kwargs):
    """Builds (download_and_prepare) a dataset into ``data_dir``; the same as ``tfds build data/<name>``.

    ``config``: a config name of the builder or a BuilderConfig object. ``manual_dir``: the folder of manually
    downloaded files (DeepFashion, TikTok). Returns the prepared builder.
    """
    import tensorflow_datasets as tfds

    from pmf_jax import storage

    if data_dir is not None and storage.is_url(data_dir):
        raise PMFInputError(f"data_dir {os.fspath(data_dir)}: datasets are built into a local folder; build there, "
                            f"then copy <data_dir>/{name} to the bucket")
    cls = builder_class(name)
    if isinstance(config, str) and config not in cls.builder_configs:
        raise PMFInputError(
            f"dataset {name}: no config {config!r}; configs: {', '.join(cls.builder_configs)} "
            "(or pass a BuilderConfig object for a custom one)"
        )

    b = builder(name, data_dir, config, **builder_kwargs)
    if b.is_prepared():
        return b
    download_config = tfds.download.DownloadConfig(manual_dir=str(manual_dir) if manual_dir else None)
    with tfds_bars(f"preparing {name}/{b.builder_config.name if b.builder_config else ''} in {data_dir}"):
        b.download_and_prepare(download_config=download_config)
    return b


def data_source(name: str, split: str, data_dir: str | Path, config=None):
    """Random-access source of decoded examples (dicts of numpy arrays / bytes) of a prepared split."""
    b = builder(name, data_dir, config)
    if not b.is_prepared():
        raise PMFInputError(
            f"dataset {name}/{b.builder_config.name if b.builder_config else ''} is not built in {data_dir}; "
            f"run `tfds build data/{name} --config CONFIG --data_dir {data_dir}` (see data/{name}/README.md)"
        )
    if split not in b.info.splits:
        raise PMFInputError(f"dataset {name}: no split {split!r}; splits: {', '.join(b.info.splits)}")
    return b.as_data_source(split=split)


# ----------------------------------------------------------------------------------------------------------------
# Per-example transform
# ----------------------------------------------------------------------------------------------------------------
def crop_and_resize(
    image: np.ndarray,
    keypoints: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator | None = None,
    crop_scale: tuple[float, float] = CROP_SCALE,
) -> tuple[np.ndarray, np.ndarray]:
    """Random crop (side ``crop_scale`` of the image, uniform position; none when ``rng`` is None), then resize.

    Args:
      image: uint8 ``[h, w, 3]``.
      keypoints: float32 ``[18, 3]`` in pixels of ``image``.
      size: ``(H, W)`` of the output.
    Returns:
      uint8 ``[H, W, 3]`` and its float32 ``[18, 3]`` keypoints (joints cropped away become missing).
    """
    h, w = image.shape[:2]
    y0, x0, ch, cw = 0, 0, h, w
    if rng is not None:
        s = rng.uniform(*crop_scale)
        ch, cw = max(1, round(s * h)), max(1, round(s * w))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    out_h, out_w = size
    crop = image[y0 : y0 + ch, x0 : x0 + cw]
    if (ch, cw) != (out_h, out_w):
        shrink = out_h * out_w < ch * cw
        crop = cv2.resize(crop, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    sx, sy = out_w / cw, out_h / ch
    keypoints = affine_keypoints(keypoints, scale=(sx, sy), offset=(-x0 * sx, -y0 * sy), size=(out_h, out_w))
    return np.ascontiguousarray(crop), keypoints


def prepare_pair(
    example: dict,
    size: tuple[int, int],
    rng: np.random.Generator | None,
    crop_scale: tuple[float, float] = CROP_SCALE,
    flip_prob: float = FLIP_PROB,
    keep_names: bool = False,
) -> dict:
    """One stored example -> one model example (see make_loader for the keys). ``rng=None``: no augmentation.

    Source and target get their own random crop; the horizontal flip (which also swaps left/right joints) is decided
    once per pair so that the source still shows the same side of the clothes as the target.
    """
    flip = rng is not None and rng.random() < flip_prob
    images, keypoints = {}, {}
    for part in ("source", "target"):
        image, kps = crop_and_resize(example[f"{part}_image"], example[f"{part}_keypoints"], size, rng, crop_scale)
        if flip:
            image, kps = image[:, ::-1], flip_keypoints(kps, size[1])
        images[part], keypoints[part] = image, kps
    pose = render_pose(keypoints["target"], size[0], size[1], *line_widths_for(*size))
    out = {
        "source": images["source"].astype(np.float32) / 127.5 - 1.0,
        "target": images["target"].astype(np.float32) / 127.5 - 1.0,
        "pose": pose.astype(np.float32) / 255.0,
        "source_keypoints": keypoints["source"],
        "target_keypoints": keypoints["target"],
    }
    if keep_names:
        for key in ("person_id", "source_name", "target_name"):
            value = example[key]
            out[key] = np.asarray(value.decode() if isinstance(value, bytes) else str(value))
    return out


@dataclasses.dataclass(frozen=True)
class PairTransform(grain.transforms.RandomMap):
    """grain transform around prepare_pair; the rng comes from the sampler (seed + global index), so the result
    depends on the seed and the example's position only, not on workers or hosts."""

    size: tuple[int, int]
    augment: bool = True
    crop_scale: tuple[float, float] = CROP_SCALE
    flip_prob: float = FLIP_PROB
    keep_names: bool = False

    def random_map(self, element, rng: np.random.Generator):
        return prepare_pair(
            element, self.size, rng if self.augment else None, self.crop_scale, self.flip_prob, self.keep_names
        )


# ----------------------------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------------------------
def _resolution(resolution) -> tuple[int, int]:
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 and s % 8 == 0 for s in size):
        raise PMFInputError(f"resolution: expected a multiple of 8 or (height, width) of them, got {resolution}")
    return size


def make_loader(
    dataset_name: str,
    split: str,
    data_dir: str | Path,
    batch_size: int,
    resolution: int | tuple[int, int],
    *,
    config: str | None = None,
    seed: int = 0,
    shuffle: bool = True,
    augment: bool = True,
    num_epochs: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    keep_names: bool = False,
) -> grain.DataLoader:
    """A grain DataLoader of batches of pose pairs from a prepared dataset.

    Args:
      dataset_name: a key of DATASETS. config: its builder config (e.g. "64", "256x176").
      split: "train" or "test".
      data_dir: the TFDS data_dir the dataset was built into.
      batch_size: examples per batch on this host (the global batch is ``batch_size * shard_count``).
      resolution: model resolution, an int (square) or ``(H, W)``; multiples of 8.
      seed: shuffle order and augmentation randomness (32-bit, >= 0).
      shuffle: global shuffle, a new order every epoch. augment: random crop (0.9-1.0) and horizontal flip.
      num_epochs: None repeats forever.
      worker_count: 0 transforms in this process; N > 0 uses N worker processes (same batches either way).
      shard_index, shard_count: this host's shard; default ``jax.process_index()``/``jax.process_count()``. Hosts see
        disjoint examples: host k the k-th consecutive slice of each global batch of one global order
        (:mod:`pmf_jax.batch_sampler`), so any host count gives the same global batches; a remainder of the epoch
        is dropped.
      drop_remainder: drop a last partial batch (keep batches the same shape for jit).
      keep_names: also return ``person_id``, ``source_name``, ``target_name`` (string arrays ``[B]``; not for jax).
    Returns:
      A ``grain.DataLoader``; ``iter(loader)`` yields dicts of numpy arrays (B = batch_size, H x W = resolution)
      ready for ``jax.make_array_from_process_local_data(batch_sharding, x)``:
        ``source``: float32 ``[B, H, W, 3]`` in [-1, 1], the person to re-pose;
        ``target``: float32 ``[B, H, W, 3]`` in [-1, 1], the ground truth in the target pose;
        ``pose``: float32 ``[B, H, W, 3]`` in [0, 1], the target's OpenPose skeleton image (ControlNet input);
        ``source_keypoints``, ``target_keypoints``: float32 ``[B, 18, 3]``, x, y in pixels of the H x W images,
        confidence (0 = missing).
      The iterator has ``get_state() -> bytes`` and ``set_state(bytes)``.
    """
    size = _resolution(resolution)
    if batch_size <= 0:
        raise PMFInputError(f"batch_size must be positive, got {batch_size}")
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise PMFInputError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    source = data_source(dataset_name, split, data_dir, config)
    if worker_count and not absl_flags.FLAGS.is_parsed():  # grain's worker processes read its absl flags
        raise PMFInputError(f"worker_count={worker_count}: absl flags are not parsed; {SETUP_HINT}")
    # The sampler orders the whole split; host k reads the k-th consecutive slice of every global batch.
    sampler = slice_batches(grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.NoSharding(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    ), batch_size, shard_index, shard_count)
    transform = PairTransform(size=size, augment=augment, keep_names=keep_names)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(batch_size=batch_size, drop_remainder=drop_remainder)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True),
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=64),
    )


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Full batches per host per epoch (what a drop-remainder loader gives)."""
    return (num_examples // shard_count) // batch_size
