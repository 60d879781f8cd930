"""``pmf eval generate``: the retarget pipeline over a dataset split's pairs, one PNG per pair, resumable.

What the config decides (pmf_jax/config.py): ``model.*`` (weights: ``base`` SD folder, ``controlnet``,
``reference_unet`` — null uses the base UNet, i.e. an untrained ACM —, ``dtype``, ``attention_backend``),
``reference.*`` (mode acm / reference_only and how the bank is read), ``data.*`` (dataset, builder config, data_dir,
``eval_split``, ``resolution``, ``eval_batch_size``) and ``sampling.*`` (scheduler, steps, guidance scales, ControlNet
scale, seed), read as :func:`pmf_jax.pipelines.from_run.sampling_kwargs` reads them
(``sampling.reference_guidance_scale`` null: no separate appearance guidance, 2 guidance rows).

Each pair gets seed ``(sampling.seed + pair index) mod 2**32``, so an image does not depend on the batch it was made
in, on the device count or on an interruption. Images are written atomically (temporary file, then rename); a rerun
skips the pairs whose PNG exists. ``generation.json`` in the output folder records the settings; resuming with
different settings is refused (they would mix two runs in one folder).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pmf_jax import config as config_lib
from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation.pairs import Pair, image_source, read_pairs

SETTINGS_FILE = "generation.json"


@dataclasses.dataclass(frozen=True)
class GenerationSummary:
    out_dir: Path
    total: int          # pairs in the split (distinct file names)
    generated: int      # written by this call
    skipped: int        # already there


def generation_settings(cfg: config_lib.Config, split: str, prompt: str, negative_prompt: str) -> Dict:
    """Everything that changes the images (what ``generation.json`` holds and a resume must match)."""
    data = cfg.data
    dataset = data.name + (f"/{data.builder_config}" if data.builder_config else "")
    as_dict = lambda section: json.loads(json.dumps(dataclasses.asdict(section)))  # noqa: E731  (tuples -> lists)
    return {"dataset": dataset, "split": split, "resolution": list(data.height_width), "prompt": prompt,
            "negative_prompt": negative_prompt, "model": as_dict(cfg.model), "reference": as_dict(cfg.reference),
            "sampling": as_dict(cfg.sampling)}


def _check_resume(out_dir: Path, settings: Dict) -> None:
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON ({err}); remove it or use another --out") from None
    changed = [f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in settings if old.get(k) != settings[k]]
    if changed:
        raise PMFInputError(f"--out {str(out_dir)!r} holds images generated with other settings "
                            f"({'; '.join(changed)}); use another --out or the same settings")


def sample_pairs(pipe, cfg: config_lib.Config, sources: np.ndarray, poses: np.ndarray, seeds: Sequence[int],
                 prompt: str, negative_prompt: str) -> List:
    """PIL images for a batch of pairs (``sources``, ``poses``: uint8 ``[B, H, W, 3]``), in one pipeline call (the
    batch is split over the devices). Image i uses ``seeds[i]`` exactly as a call with that seed alone would, so the
    images do not depend on the batching or on an interrupted run."""
    from pmf_jax.pipelines.from_run import sampling_kwargs

    h, w = sources.shape[1:3]
    return pipe(list(sources), list(poses), prompt=prompt, negative_prompt=negative_prompt, height=h, width=w,
                num_images=1, seed=[int(x) for x in seeds], pose_kind="skeleton", **sampling_kwargs(cfg, pipe.mode))


def _batches(pairs: List[Pair], size: int):
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


def generate(cfg: config_lib.Config, out_dir, *, split: Optional[str] = None, prompt: str = "",
             negative_prompt: str = "", pipeline=None, limit: Optional[int] = None,
             progress: bool = True) -> GenerationSummary:
    """Generates the missing images of the split's pairs into ``out_dir``.

    Args:
      cfg: the config (see the module docstring for the fields used).
      split: default ``cfg.data.eval_split``.
      prompt, negative_prompt: the text prompt of every pair (recorded; ``pmf eval score`` uses it for CLIP score).
      pipeline: a built RetargetPipeline (default: :func:`~pmf_jax.pipelines.from_run.pipeline_from_run` of the
        config, built once there is something to generate).
      limit: only the first ``limit`` pairs of the split (smoke runs).
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PMFInputError(f"--out {str(out_dir)!r} exists and is not a folder")
    data = cfg.data
    split = split or data.eval_split
    settings = generation_settings(cfg, split, prompt, negative_prompt)
    _check_resume(out_dir, settings)
    pairs = read_pairs(data.name, data.builder_config, split, data.data_dir)
    if limit is not None:
        pairs = pairs[:limit]
    unique = list({p.filename: p for p in reversed(pairs)}.values())[::-1]  # one image per file name, split order
    todo = [p for p in unique if not (out_dir / p.filename).is_file()]
    if not todo:
        return GenerationSummary(out_dir, len(unique), 0, len(unique))

    from pmf_jax.input_pipeline import prepare_pair

    pipe = pipeline
    if pipe is None:
        from pmf_jax.pipelines.from_run import pipeline_from_run

        pipe = pipeline_from_run(cfg)
    # Recorded once the models load, so that a failed start (e.g. a wrong path) does not block the corrected run.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    source = image_source(data.name, data.builder_config, split, data.data_dir)
    bar = tqdm(total=len(todo), desc=f"generate {settings['dataset']} {split}", unit="pair", disable=not progress)
    for batch in _batches(todo, data.eval_batch_size):
        examples = [prepare_pair(source[p.index], data.height_width, None) for p in batch]
        sources = np.stack([_to_uint8(e["source"], -1.0) for e in examples])   # [B, H, W, 3]
        poses = np.stack([_to_uint8(e["pose"], 0.0) for e in examples])
        seeds = [(cfg.sampling.seed + p.index) % 2**32 for p in batch]
        images = sample_pairs(pipe, cfg, sources, poses, seeds, prompt, negative_prompt)
        for pair, image in zip(batch, images):
            _save_atomic(image, out_dir / pair.filename)
        bar.update(len(batch))
    bar.close()
    return GenerationSummary(out_dir, len(unique), len(todo), len(unique) - len(todo))


def _to_uint8(x: np.ndarray, low: float) -> np.ndarray:
    """The loader's float images ([-1, 1] photos, [0, 1] skeletons) back to the exact uint8 they came from."""
    return np.round((x - low) / (1.0 - low) * 255.0).astype(np.uint8)


def _save_atomic(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
