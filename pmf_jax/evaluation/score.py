"""``pmf eval score``: SSIM, PSNR, LPIPS, FID and (prompted runs) CLIP score of a folder of generated images.

The generated folder holds one ``<source>___<target>.png`` per pair of the split (see
:mod:`pmf_jax.evaluation.pairs`); the ground truth is the split's stored target image (256x176 for
``deepfashion_pairs/256x176``). The protocol scores at the ground truth's size: a generated image of another size is
an error naming it and both sizes, unless ``resize=True`` (``--resize``) resizes it (bicubic) first. Every pair must
be there; a missing or unreadable image is an error naming it.

- SSIM / PSNR: :mod:`pmf_jax.metrics.ssim_psnr` (the protocol's scikit-image settings, in JAX), per pair, averaged.
- LPIPS: AlexNet v0.1 (``lpips`` package), per pair, averaged.
- FID: generated images vs the **training** images (every distinct image of the train split, as PIDM / CFLD / PCDMs
  do), pytorch-fid Inception pool3 features. Reference statistics are cached in ``stats_cache`` (default
  ``~/.cache/pmf_jax/fid_stats``) per dataset, split and feature network; ``fid_reference`` may also be an ``.npz``
  of statistics (``mu``, ``sigma``, ``n``).
- CLIP score: generated image vs the run's prompt (from ``generation.json`` or ``prompt=``), only when there is one.

The generated folder may be a URL (``gs://bucket/...``): it is read through a cached local copy
(:func:`pmf_jax.storage.local_copy`, with a progress bar); the report may be written to a URL too
(:func:`pmf_jax.evaluation.report.write_report`).

A metric whose network or package is missing is reported unavailable with the reason; the others are computed.
When none of the requested metrics can be computed, that is an error (the CLI exits 2) listing the reasons.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation.generate import SETTINGS_FILE
from pmf_jax.evaluation.pairs import SEPARATOR, Pair, dataset_size, image_source, read_pairs
from pmf_jax.metrics import ssim_psnr
from pmf_jax.metrics.availability import MetricUnavailable, check_any_available
from pmf_jax.metrics.clip_score import DEFAULT_CLIP
from pmf_jax.metrics.fid import FeatureExtractor, FeatureStats, frechet_distance
from pmf_jax.progress import bar as progress_bar

METRICS = ("ssim", "psnr", "lpips", "fid", "clip_score")
DEFAULT_STATS_CACHE = Path("~/.cache/pmf_jax/fid_stats")
MISSING_SHOWN = 5


def wrong_size_message(path: Path, got, size) -> str:
    """The error for a generated image of ``got`` (W, H) where the ground truth is ``size`` (H, W)."""
    return (f"generated image {str(path)!r} is {got[0]}x{got[1]}, the ground truth is {size[1]}x{size[0]} (W x H): "
            f"the protocol scores at the ground truth's size; generate at that size, or pass --resize to resize "
            f"the generated images (bicubic)")


def check_sizes(generated_dir: Path, pairs: Sequence[Pair], size, resize: bool) -> None:
    """Unless ``resize``: every generated image is ``size`` (H, W), read from the file headers (nothing decoded),
    so that a wrong size fails before any metric network loads."""
    if resize:
        return
    from PIL import Image, UnidentifiedImageError

    for pair in pairs:
        path = generated_dir / pair.filename
        try:
            with Image.open(path) as image:
                got = image.size
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap width and height
                    got = got[::-1]
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError):
            continue  # unreadable: _load_generated names it
        if got != (size[1], size[0]):
            raise PMFInputError(wrong_size_message(path, got, size))


def _load_generated(path: Path, size, resize: bool = False) -> np.ndarray:
    """uint8 ``[H, W, 3]`` at ``size``; another size is an error unless ``resize`` (bicubic); PMFInputError naming
    the file if unreadable."""
    from PIL import Image

    from pmf_jax.image_reading import read_image_file

    image = Image.fromarray(read_image_file(path, "generated image"))
    if image.size != (size[1], size[0]):
        if not resize:
            raise PMFInputError(wrong_size_message(path, image.size, size))
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return np.asarray(image, np.uint8)


def check_generated(generated_dir: Path, pairs: Sequence[Pair], what: str) -> None:
    """Every pair has its PNG and no ``___`` PNG belongs to another split/dataset; else one clear error."""
    if not generated_dir.is_dir():
        raise PMFInputError(f"--generated {str(generated_dir)!r} is not a folder")
    expected = {p.filename for p in pairs}
    missing = sorted(name for name in expected if not (generated_dir / name).is_file())
    if missing:
        raise PMFInputError(
            f"--generated {str(generated_dir)!r} lacks {len(missing)} of the {len(expected)} images of {what}, e.g. "
            f"{', '.join(missing[:MISSING_SHOWN])}; run `pmf eval generate` with --out {generated_dir} (it resumes)")
    strays = sorted(p.name for p in generated_dir.glob(f"*{SEPARATOR}*.png") if p.name not in expected)
    if strays:
        raise PMFInputError(
            f"--generated {str(generated_dir)!r} holds {len(strays)} images that are not pairs of {what}, e.g. "
            f"{', '.join(strays[:MISSING_SHOWN])}: wrong --dataset or split?")


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _pad(batch: np.ndarray, size: int) -> np.ndarray:
    """Pads the batch axis to ``size`` (repeating the last image) so the jitted metrics compile once."""
    return batch if len(batch) == size else np.concatenate([batch, np.repeat(batch[-1:], size - len(batch), 0)])


def reference_stats(extractor: FeatureExtractor, reference: str, name: str, config: Optional[str], data_dir,
                    stats_cache: Optional[os.PathLike] = None, progress: bool = True) -> Dict:
    """FID reference statistics: a split's distinct images (cached) or an ``.npz`` file.

    Returns:
      ``{"stats": FeatureStats, "source": description, "cache": path or None}``.
    """
    if reference.endswith(".npz"):
        return {"stats": FeatureStats.load(reference), "source": reference, "cache": None}
    source = image_source(name, config, reference, data_dir)
    # The key names the data (dataset, config, split and its size) and the network; a rebuilt dataset of another
    # size gets new statistics. Delete the cache folder after changing the data in any other way.
    cache_dir = Path(stats_cache or DEFAULT_STATS_CACHE).expanduser()
    tag = f"{name}_{config or 'default'}_{reference}{len(source)}_{extractor.name}".replace("/", "-")
    cache = cache_dir / f"{tag}.npz"
    if cache.is_file():
        return {"stats": FeatureStats.load(cache), "source": f"{reference} split (cached)", "cache": str(cache)}
    stats, seen, batch = FeatureStats(), set(), []
    for i in progress_bar(range(len(source)), desc=f"FID reference: {reference} images", unit="pair",
                          disable=not progress):
        example = source[i]
        for part in ("source", "target"):  # every distinct image of the split
            key = example[f"{part}_name"]
            if key not in seen:
                seen.add(key)
                batch.append(example[f"{part}_image"])
        while len(batch) >= extractor.batch_size:
            stats.update(extractor(np.stack(batch[: extractor.batch_size])))
            batch = batch[extractor.batch_size :]
    if batch:
        stats.update(extractor(np.stack(batch)))
    stats.save(cache, extractor=extractor.name, reference=reference, dataset=f"{name}/{config}")
    return {"stats": stats, "source": f"{reference} split ({stats.n} distinct images)", "cache": str(cache)}


def _open_metrics(metrics, weights_dir, clip_model, prompt, feature_extractor, results):
    """The metric objects that can run; the others go to ``results`` as unavailable with their reason."""
    opened = {}

    def unavailable(metric: str, reason: str):
        results[metric] = {"available": False, "reason": reason}

    if "lpips" in metrics:
        try:
            from pmf_jax.metrics.lpips import LPIPS

            opened["lpips"] = LPIPS(weights_dir)
        except MetricUnavailable as err:
            unavailable("lpips", err.reason)
    if "fid" in metrics:
        try:
            if feature_extractor is None:
                from pmf_jax.metrics.fid import inception_extractor

                feature_extractor = inception_extractor(weights_dir)
            opened["fid"] = feature_extractor
        except MetricUnavailable as err:
            unavailable("fid", err.reason)
    if "clip_score" in metrics:
        if not prompt:
            unavailable("clip_score", "not applicable: the run has no text prompt")
        else:
            try:
                from pmf_jax.metrics.clip_score import CLIPScore

                opened["clip_score"] = CLIPScore(clip_model)
            except MetricUnavailable as err:
                unavailable("clip_score", err.reason)
    return opened


def score(generated_dir, dataset: str, config: Optional[str] = None, data_dir=None, *, split: str = "test",
          fid_reference: str = "train", weights_dir: Optional[os.PathLike] = None,
          clip_model: str = DEFAULT_CLIP, prompt: Optional[str] = None, metrics: Sequence[str] = METRICS,
          feature_extractor: Optional[FeatureExtractor] = None, stats_cache: Optional[os.PathLike] = None,
          batch_size: int = 16, ssim_sigma: float = ssim_psnr.SIGMA, resize: bool = False,
          progress: bool = True) -> Dict:
    """Scores ``generated_dir`` against the split's ground truth (see the module docstring).

    Args:
      dataset, config: e.g. ``"deepfashion_pairs"``, ``"256x176"``. data_dir: the TFDS data_dir (default TFDS's).
      fid_reference: a split name (its distinct images) or an ``.npz`` of statistics.
      weights_dir: where LPIPS/FID weights are looked for first (:mod:`pmf_jax.metrics.availability`).
      clip_model: CLIP folder or cached repo id. prompt: overrides ``generation.json``'s prompt.
      metrics: a subset of :data:`METRICS`.
      feature_extractor: FID features (default: pytorch-fid Inception from ``weights_dir``).
      resize: resize generated images of another size to the ground truth's (bicubic); default: an error.
    Returns:
      A JSON-ready dict: ``metrics`` (name -> ``{"available": True, "value", "n"}`` or ``{"available": False,
      "reason"}``), ``per_pair`` (file, ssim, psnr, lpips), and the settings used.
    Raises:
      PMFInputError: bad inputs (missing or stray images, a wrong size without ``resize``), and when none of the
        requested metrics can be computed (:func:`~pmf_jax.metrics.availability.check_any_available`).
    """

    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise PMFInputError(f"unknown metrics {', '.join(unknown)}; known: {', '.join(METRICS)}")
    from pmf_jax import storage

    given = os.fspath(generated_dir)
    if storage.is_url(given):  # read from a local copy of the objects (downloaded once, reused while unchanged)
        generated_dir = storage.local_copy(given, desc=f"download {given}")
    generated_dir = Path(generated_dir)
    what = f"{dataset}/{config or 'default'} {split}"
    if not generated_dir.is_dir():
        raise PMFInputError(f"--generated {given!r} is not a folder")
    pairs = read_pairs(dataset, config, split, data_dir)
    if not pairs:
        raise PMFInputError(f"{what} has no pairs")
    settings = _generation_settings(generated_dir)
    if settings.get("limit"):  # `pmf eval generate --limit N`: its first N pairs are the ones to score
        pairs = pairs[:int(settings["limit"])]
        what += f" (the first {len(pairs)} pairs: generated with --limit)"
    check_generated(generated_dir, pairs, what)
    if "fid" in metrics:
        _check_reference(fid_reference, dataset, config, data_dir)
    if prompt is None:
        prompt = settings.get("prompt", "")
    size = dataset_size(dataset, config, data_dir)
    check_sizes(generated_dir, pairs, size, resize)

    results: Dict[str, Dict] = {}
    opened = _open_metrics(metrics, weights_dir, clip_model, prompt, feature_extractor, results)
    check_any_available({m: results.get(m, {"available": True}) for m in metrics})  # before any image is scored
    per_pair: Dict[str, List[float]] = {m: [] for m in ("ssim", "psnr") if m in metrics}
    if "lpips" in opened:
        per_pair["lpips"] = []
    generated_stats = FeatureStats()
    source = image_source(dataset, config, split, data_dir)
    batches = list(_batches(pairs, batch_size))
    for batch in progress_bar(batches, desc=f"score {what}", unit="batch", disable=not progress):
        gen = np.stack([_load_generated(generated_dir / p.filename, size, resize) for p in batch])  # [B, H, W, 3]
        ref = np.stack([source[p.index]["target_image"] for p in batch])
        n = len(batch)
        if "ssim" in per_pair:
            per_pair["ssim"] += np.asarray(ssim_psnr.ssim(_pad(gen, batch_size), _pad(ref, batch_size),
                                                          sigma=ssim_sigma))[:n].tolist()
        if "psnr" in per_pair:
            per_pair["psnr"] += np.asarray(ssim_psnr.psnr(_pad(gen, batch_size), _pad(ref, batch_size)))[:n].tolist()
        if "lpips" in opened:
            per_pair["lpips"] += opened["lpips"](gen, ref).tolist()
        if "fid" in opened:
            generated_stats.update(opened["fid"](gen))
        if "clip_score" in opened:
            opened["clip_score"].update(gen, [prompt] * n)

    for metric, values in per_pair.items():
        results[metric] = {"available": True, "value": _finite(float(np.mean(values))), "n": len(values)}
    if "fid" in opened:
        ref_stats = reference_stats(opened["fid"], fid_reference, dataset, config, data_dir, stats_cache, progress)
        if min(generated_stats.n, ref_stats["stats"].n) < 2:
            results["fid"] = {"available": False, "reason": f"FID needs at least 2 images per set (generated "
                                                            f"{generated_stats.n}, reference {ref_stats['stats'].n})"}
        else:
            results["fid"] = {"available": True, "value": frechet_distance(generated_stats, ref_stats["stats"]),
                              "n": generated_stats.n, "reference": ref_stats["source"],
                              "reference_n": ref_stats["stats"].n, "features": opened["fid"].name}
    if "clip_score" in opened:
        results["clip_score"] = {"available": True, "value": opened["clip_score"].compute(), "n": len(pairs),
                                 "prompt": prompt, "model": opened["clip_score"].model}
    if "lpips" in opened:
        results["lpips"]["weights"] = opened["lpips"].weights

    check_any_available(results)  # FID may still have found too few images
    from pmf_jax.evaluation.temporal import sequences, temporal_consistency

    temporal = temporal_consistency(sequences(pairs), lambda p: _load_generated(generated_dir / p.filename, size,
                                                                                resize),
                                    lambda p: source[p.index]["target_image"])
    files = [p.filename for p in pairs]
    return {
        "dataset": f"{dataset}/{config}" if config else dataset,
        "split": split,
        "generated": given if storage.is_url(given) else str(generated_dir),
        "num_pairs": len(pairs),
        "image_size": list(size),
        "resized": resize,
        "metrics": {m: results[m] for m in METRICS if m in results},
        "protocol": {"ssim": f"gaussian window sigma={ssim_sigma}, population covariance, data_range = generated "
                             "max - min, per channel, 5 px border excluded (scikit-image settings of PATN/GFLA)",
                     "psnr": "data_range 255 over all channels", "lpips": "AlexNet v0.1, inputs in [-1, 1]",
                     "fid": f"Fréchet distance of feature statistics, generated vs {fid_reference} images "
                            "(network: metrics.fid.features)"},
        "generation": settings,
        "temporal_consistency": temporal,
        "per_pair": [dict(file=f, **{m: _finite(per_pair[m][i]) for m in per_pair}) for i, f in enumerate(files)],
    }


def _check_reference(reference: str, name: str, config: Optional[str], data_dir) -> None:
    """Fails fast (before scoring) on an FID reference that is neither an existing .npz nor a split."""
    if reference.endswith(".npz"):
        if not Path(reference).is_file():
            raise PMFInputError(f"--fid-reference {reference!r}: file not found")
        return
    from pmf_jax import input_pipeline
    from pmf_jax.evaluation.pairs import resolve_data_dir

    splits = input_pipeline.builder(name, resolve_data_dir(data_dir), config).info.splits
    if reference not in splits:
        raise PMFInputError(f"--fid-reference {reference!r} is neither a split of {name} ({', '.join(splits)}) "
                            f"nor an .npz of statistics")


def _finite(value: float):
    """JSON has no inf (identical images give PSNR inf): written as the string "inf"."""
    return value if math.isfinite(value) else str(value)


def _generation_settings(generated_dir: Path) -> Dict:
    path = generated_dir / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON ({err})") from None
