"""``pmf eval generate``: the retarget pipeline over a dataset split's pairs, one PNG per pair, resumable.

What the config decides (pmf_jax/config.py): ``model.*`` (weights: ``base`` SD folder, ``controlnet``,
``reference_unet`` — null uses the base UNet, i.e. an untrained ACM —, ``dtype``, ``attention_backend``),
``reference.*`` (mode acm / reference_only and how the bank is read), ``data.*`` (dataset, builder config, data_dir,
``eval_split``, ``resolution``, ``eval_batch_size``) and ``sampling.*`` (scheduler, steps, guidance scales, ControlNet
scale, seed), read as :func:`pmf_jax.pipelines.from_run.sampling_kwargs` reads them
(``sampling.reference_guidance_scale`` null: no separate appearance guidance, 2 guidance rows).

``--model`` instead evaluates a training run or a PMF export (:mod:`pmf_jax.evaluation.model`).

Each pair gets seed ``(sampling.seed + pair index) mod 2**32``, so an image does not depend on the batch it was made
in, on the device count or on an interruption. The output folder follows :mod:`pmf_jax.out_folder`: checked before
any model loads, a non-empty one refused unless ``overwrite``, and a new generation staged in ``<out>.partial``,
which becomes ``<out>`` once every image exists. A stopped run leaves ``<out>.partial``; the next run with the same
settings continues it. A complete ``<out>`` is resumed in place (e.g. after deleting images). Images are written
whole (temporary file, then rename); a rerun skips the pairs whose PNG exists. ``generation.json`` records the
settings; resuming with different settings is refused (they would mix two runs in one folder).

``--out`` may be a URL (``gs://bucket/...``): the stage is then a local folder keyed by the URL
(``<storage cache>/partial/gs/<bucket>/<path>.partial``, :func:`pmf_jax.out_folder.partial_folder`), so a stopped run
is continued on the same machine, and the finished folder is uploaded with ``generation.json`` last. A complete
generation on a URL is not resumed in place: a non-empty URL ``--out`` needs ``--overwrite``.

**Several processes** (launched as the trainer is, e.g. one per host of a TPU pod: ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` or ``PMF_DISTRIBUTED=1``; :mod:`pmf_jax.parallel.distributed`): the
processes agree on the images still missing (the union of what their stages hold), process k makes the k-th of every
N of them on its own devices (no collective between processes; each image is the same as in a one-process run, as
its seed is its pair's), and process 0 commits the folder: on a local ``--out``, which must then be a filesystem that
every process sees, the processes write into the one ``<out>.partial``; on a URL every process stages its part on
its own host (process k > 0 in ``<stage>-process<k>``) and uploads it, and process 0 uploads ``generation.json`` last,
once every image is there. A missing image (a local ``--out`` that is not shared) is process 0's error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from pmf_jax import config as config_lib
from pmf_jax.errors import PMFInputError
from pmf_jax.evaluation.pairs import Pair, image_source, read_pairs
from pmf_jax.progress import bar as progress_bar

SETTINGS_FILE = "generation.json"


@dataclasses.dataclass(frozen=True)
class GenerationSummary:
    out_dir: Path
    total: int          # pairs in the split (distinct file names)
    generated: int      # written by this call
    skipped: int        # already there


def generation_settings(cfg: config_lib.Config, split: str, prompt: str, negative_prompt: str, model=None,
                        reference=None, mode=None) -> Dict:
    """Everything that changes the images (what ``generation.json`` holds and a resume must match). ``model``: the
    :class:`~pmf_jax.evaluation.model.EvalModel` (recorded as ``model_source``); ``reference``: an export's
    ReferenceConfig and ``mode`` its pipeline mode, used instead of ``cfg.reference``."""
    data = cfg.data
    dataset = data.name + (f"/{data.builder_config}" if data.builder_config else "")
    as_dict = lambda section: json.loads(json.dumps(dataclasses.asdict(section)))  # noqa: E731  (tuples -> lists)
    settings = {"dataset": dataset, "split": split, "resolution": list(data.height_width), "prompt": prompt,
                "negative_prompt": negative_prompt, "model": as_dict(cfg.model),
                "reference": (as_dict(cfg.reference) if reference is None
                              else dict(as_dict(reference), mode=mode)),
                "sampling": as_dict(cfg.sampling)}
    if model is not None and model.kind != "config":
        settings["model_source"] = model.describe()
    return settings


def _check_resume(folder: Path, settings: Dict, what: str) -> None:
    """PMFInputError when ``folder`` (``what`` names it) holds a generation with other settings."""
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PMFInputError(f"{path} is not valid JSON ({err}); remove it, use another --out or pass --overwrite") \
            from None
    old.pop("limit", None)  # how many pairs were asked for last time: a resume may ask for more or fewer
    keys = sorted(set(settings) | set(old))
    changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in keys if old.get(k) != settings.get(k)]
    if changed:
        raise PMFInputError(f"{what} {str(folder)!r} holds images generated with other settings "
                            f"({'; '.join(changed)}); use another --out, the same settings or --overwrite")


def sample_pairs(pipe, cfg: config_lib.Config, sources: np.ndarray, poses: np.ndarray, seeds: Sequence[int],
                 prompt: str, negative_prompt: str, reference=None) -> List:
    """PIL images for a batch of pairs (``sources``, ``poses``: uint8 ``[B, H, W, 3]``), in one pipeline call (the
    batch is split over the devices). Image i uses ``seeds[i]`` exactly as a call with that seed alone would, so the
    images do not depend on the batching or on an interrupted run. ``reference``: a ReferenceConfig instead of
    ``cfg.reference`` (an export's own)."""
    from pmf_jax.pipelines.from_run import sampling_kwargs

    kwargs = sampling_kwargs(cfg, pipe.mode)
    if reference is not None:
        kwargs["reference_config"] = reference
    h, w = sources.shape[1:3]
    return pipe(list(sources), list(poses), prompt=prompt, negative_prompt=negative_prompt, height=h, width=w,
                num_images=1, seed=[int(x) for x in seeds], pose_kind="skeleton", **kwargs)


def _batches(pairs: List[Pair], size: int):
    for start in range(0, len(pairs), size):
        yield pairs[start : start + size]


def generate(cfg: config_lib.Config, out_dir, *, split: Optional[str] = None, prompt: str = "",
             negative_prompt: str = "", pipeline=None, model=None, limit: Optional[int] = None,
             progress: bool = True, allow_pickle: bool = False, overwrite: bool = False,
             sequence: bool = False) -> GenerationSummary:
    """Generates the missing images of the split's pairs into ``out_dir``.

    Args:
      cfg: the config (see the module docstring for the fields used).
      split: default ``cfg.data.eval_split``.
      prompt, negative_prompt: the text prompt of every pair (recorded; ``pmf eval score`` uses it for CLIP score).
      pipeline: a built RetargetPipeline (default: the one of ``model``, built once there is something to generate).
      model: an :class:`~pmf_jax.evaluation.model.EvalModel` (``--model``: a training run or a PMF export); default
        the folders the config's ``model`` section names.
      limit: only the first ``limit`` pairs of the split (recorded in generation.json: :func:`~pmf_jax.evaluation.score`
        then scores those pairs).
      allow_pickle: as :func:`pmf_jax.io.from_pretrained`, for the models the config names.
      overwrite: start afresh, replacing a non-empty ``out_dir`` when the new images are complete.
      sequence: per video (TikTok's ``video/frame`` names; :func:`pmf_jax.evaluation.temporal.sequences`) the
        person of its first source frame is animated along the targets' poses in frame order by
        :class:`~pmf_jax.pipelines.sequence.SequencePipeline` (one bank and one x_T per video: seed
        ``sampling.seed`` + that pair's index); each frame is written under its pair's file name (the first pair of
        a target shared by several), so ``pmf eval score`` scores the frames and adds the clips' temporal
        consistency. Other pairs as without it.
    Raises:
      PMFInputError: before any model loads, for an ``out_dir`` that is a file, not writable, non-empty and not a
        generation (without ``overwrite``), or a generation with other settings.
    """
    from pmf_jax.evaluation.model import EvalModel, build_pipeline, export_reference
    from pmf_jax.out_folder import check_can_create, check_out_folder, partial_folder, staged_folder

    model = model or EvalModel("config")
    from pmf_jax import storage

    url = storage.is_url(out_dir)
    out_dir = storage.user_path(out_dir)
    data = cfg.data
    split = split or data.eval_split
    mode, reference = export_reference(model, cfg)
    settings = generation_settings(cfg, split, prompt, negative_prompt, model, reference, mode)
    if sequence:
        settings["sequence"] = True
    in_place = not url and not overwrite and out_dir.is_dir() and (out_dir / SETTINGS_FILE).is_file()
    if in_place:  # a complete generation: resumed where it is (every image is written whole)
        check_can_create(out_dir / SETTINGS_FILE)
        _check_resume(out_dir, settings, "--out")
        target = out_dir
    else:  # staged in <out>.partial (which a stopped run left to resume), moved to out_dir once complete
        check_out_folder(out_dir, overwrite)
        target = partial_folder(out_dir)
        if not overwrite:
            _check_resume(target, settings, f"{str(target)!r} (a stopped run of --out)")
    pairs = read_pairs(data.name, data.builder_config, split, data.data_dir)
    if limit is not None:
        pairs = pairs[:limit]
    unique = list({p.filename: p for p in reversed(pairs)}.values())[::-1]  # one image per file name, split order
    team = Team.of_this_run()
    if url and team.rank:  # each process stages its part of a URL's folder in its own local folder
        target = target.with_name(f"{target.name}-process{team.rank}")
    fresh = overwrite or not target.is_dir()
    done = set() if fresh else {p.filename for p in unique if (target / p.filename).is_file()}
    done = team.union("done", done)  # every process's stage (a URL's stage is on its own host)
    todo = [p for p in unique if p.filename not in done]
    mine = todo[team.rank :: team.size]
    if in_place and not todo:
        return GenerationSummary(out_dir, len(unique), 0, len(unique))

    pipe = pipeline
    if pipe is None and mine:
        pipe = build_pipeline(cfg, model, allow_pickle=allow_pickle)

    def write(folder: Path) -> None:
        if team.rank == 0:  # recorded once the models load: a failed start does not block the corrected run
            recorded = settings if limit is None else dict(settings, limit=limit)  # pmf eval score scores those
            (folder / SETTINGS_FILE).write_text(json.dumps(recorded, indent=2) + "\n")
        if not mine:
            return
        from pmf_jax.input_pipeline import prepare_pair

        source = image_source(data.name, data.builder_config, split, data.data_dir)
        bar = progress_bar(total=len(mine), desc=f"generate {settings['dataset']} {split}{team.label}", unit="pair",
                           disable=not progress)
        rest = mine
        if sequence:
            rest = animate_clips(pipe, cfg, source, unique, mine, folder, prompt, negative_prompt, reference, bar)
        for batch in _batches(rest, data.eval_batch_size):
            examples = [prepare_pair(source[p.index], data.height_width, None) for p in batch]
            sources = np.stack([_to_uint8(e["source"], -1.0) for e in examples])   # [B, H, W, 3]
            poses = np.stack([_to_uint8(e["pose"], 0.0) for e in examples])
            seeds = [(cfg.sampling.seed + p.index) % 2**32 for p in batch]
            images = sample_pairs(pipe, cfg, sources, poses, seeds, prompt, negative_prompt, reference)
            for pair, image in zip(batch, images):
                _save_atomic(image, folder / pair.filename)
            bar.update(len(batch))
        bar.close()

    def gather_parts(folder) -> None:
        """Process 0, before the commit: the other processes' images are in ``folder`` (``out_dir`` or the stage
        on a shared filesystem; a URL's are uploaded by their processes)."""
        team.barrier("parts")       # every process has made its images ...
        team.barrier("delivered")   # ... and uploaded them (URL)
        where = storage.object_listing(out_dir) if url else {p.name for p in folder.iterdir()}
        missing = [p.filename for p in unique if p.filename not in where]
        if missing:
            raise PMFInputError(
                f"--out {str(out_dir)!r}: {len(missing)} of the {len(unique)} images of the {team.size} processes "
                f"are missing (e.g. {missing[0]}); every process must see --out: a URL (gs://...) or a shared "
                f"filesystem")

    if team.rank != 0:  # a part of the folder that process 0 commits
        folder = target
        team.barrier("stage made")  # process 0 made (or, --overwrite, emptied) the stage: nobody writes before
        if url and overwrite:       # a URL's stage is this host's own
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
        team.barrier("parts")
        if url:
            storage.publish_folder(folder, out_dir, index=False, desc=f"upload {out_dir}{team.label}")
        team.barrier("delivered")
    elif in_place:
        team.barrier("stage made")
        write(out_dir)
        if team.size > 1:
            gather_parts(out_dir)
    else:
        hook = (lambda: gather_parts(partial_folder(out_dir))) if team.size > 1 else None
        with staged_folder(out_dir, overwrite, partial="resume", before_commit=hook) as stage:
            team.barrier("stage made")
            write(stage)
    return GenerationSummary(out_dir, len(unique), len(todo), len(unique) - len(todo))


class Team:
    """The processes of a multi-process ``pmf eval generate`` (one per host): process k makes the k-th of every
    ``size`` missing images on its own devices; process 0 commits the folder. One process: every call is a no-op."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size
        self.label = f" (process {rank} of {size})" if size > 1 else ""

    @classmethod
    def of_this_run(cls) -> "Team":
        import jax

        return cls(jax.process_index(), jax.process_count())

    def barrier(self, name: str) -> None:
        if self.size > 1:
            from pmf_jax.parallel import distributed

            distributed.barrier(f"eval-generate/{name}")

    def union(self, name: str, names: set) -> set:
        if self.size == 1:
            return names
        from pmf_jax.parallel import distributed

        texts = distributed.all_gather_text(f"eval-generate/{name}", json.dumps(sorted(names)))
        return set().union(*(json.loads(t) for t in texts))


def animate_clips(pipe, cfg: config_lib.Config, source, pairs: List[Pair], todo: List[Pair], folder: Path,
                  prompt: str, negative_prompt: str, reference, bar) -> List[Pair]:
    """Writes the frames in ``todo`` of every clip of ``pairs`` (``generate(sequence=True)``); returns the pairs of
    ``todo`` that belong to no clip. A clip's frames do not depend on which of them are generated together (the
    sequence pipeline's frames are those of one-image calls, all from the clip's seed), so a resumed run only makes
    the missing ones."""
    from pmf_jax.evaluation.temporal import first_source, sequences
    from pmf_jax.input_pipeline import prepare_pair
    from pmf_jax.pipelines.from_run import sampling_kwargs
    from pmf_jax.pipelines.sequence import SequencePipeline, to_uint8
    from PIL import Image

    wanted = {p.filename for p in todo}
    clips = sequences(pairs)
    in_clips = {p.filename for clip in clips for p in clip}
    kwargs = sampling_kwargs(cfg, pipe.mode)
    if reference is not None:
        kwargs["reference_config"] = reference
    seq, (h, w) = SequencePipeline(pipe), cfg.data.height_width
    for whole in clips:
        first = first_source(whole)
        seed = (cfg.sampling.seed + first.index) % 2**32
        clip = [p for p in whole if p.filename in wanted]
        if not clip:
            continue
        person = _to_uint8(prepare_pair(source[first.index], cfg.data.height_width, None)["source"], -1.0)
        poses = [_to_uint8(prepare_pair(source[p.index], cfg.data.height_width, None)["pose"], 0.0) for p in clip]
        for start, frames in seq.chunks(person, poses, prompt=prompt,
                                        negative_prompt=negative_prompt, height=h, width=w, seed=seed,
                                        pose_kind="skeleton", batch_frames=cfg.data.eval_batch_size, **kwargs):
            for pair, frame in zip(clip[start:], to_uint8(frames)):
                _save_atomic(Image.fromarray(frame), folder / pair.filename)
            bar.update(len(frames))
    return [p for p in todo if p.filename not in in_clips]   # (a target shared by several pairs: its first)


def _to_uint8(x: np.ndarray, low: float) -> np.ndarray:
    """The loader's float images ([-1, 1] photos, [0, 1] skeletons) back to the exact uint8 they came from."""
    return np.round((x - low) / (1.0 - low) * 255.0).astype(np.uint8)


def _save_atomic(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
