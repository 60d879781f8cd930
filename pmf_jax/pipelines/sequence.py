"""Pose sequences: one source person driven along many poses (``pmf animate``), built on
:class:`~pmf_jax.pipelines.RetargetPipeline`'s public programs.

A sequence call runs its F frames in chunks of ``batch_frames`` (bounded memory: each chunk is streamed to the
caller as it completes). One chunk is one run of three programs, data parallel over the D batch shards (all devices
of all hosts):

  * **prologue**: x_T of every frame; the source's latent and, for ``reference_timestep="zero"``, the bank — written
    once from the *one* source for the whole chunk;
  * **loop**: every step writes the bank once (``reference_timestep="same"``: one reference-UNet call per step for
    all frames), then every frame reads it through :meth:`RetargetPipeline.model_fn` (:mod:`pmf_jax.rows`: the bank
    has fewer samples than the frames);
  * **epilogue**: the decoder, frame by frame.

Layout: the chunk's frames are padded to S·D and frame ``d·S + s`` lives on shard d. The source is copied once per
shard ([D, ...]), so each device writes its own copy of the bank and its frames read it locally: no collective moves
a bank-sized array. Within a device the frames run one after another (``lax.map`` over s, one frame per device per
iteration): every frame is computed by the very program shape of a one-image :class:`RetargetPipeline` call on one
device (G guidance rows reading a one-sample bank). XLA:CPU rounds a row differently depending on its position in a
larger batch, so this is what makes a frame byte-identical to ``pmf retarget`` on its pose, whatever the chunk size
and the device count; the saving is the bank (written once per step instead of once per frame) and the calls.

Noise: every frame starts from the same x_T (image 0 of the seed, as a one-image retarget call) — the simple
temporal-consistency trick — unless ``independent_noise``: frame i then draws image i of the seed (row i of
:func:`pmf_jax.schedulers.noise.row_keys`), whatever chunk it falls in.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pmf_jax import constants
from pmf_jax.errors import PMFInputError
from pmf_jax.parallel.rules import with_logical_constraint
from pmf_jax.pipelines import common
from pmf_jax.pipelines.base import SamplingPipeline
from pmf_jax.pipelines.images import load_image, resolve_size, to_float
from pmf_jax.pipelines.retarget_inputs import LAYOUTS, RetargetBatch, RetargetStatic, retarget_scalars
from pmf_jax.reference import ReferenceConfig
from pmf_jax.schedulers import noise as noise_lib

DEFAULT_BATCH_FRAMES = constants.DEFAULT_BATCH_FRAMES


@flax.struct.dataclass
class SequenceBatch:
    """One chunk: ``frames`` (a :class:`RetargetBatch` of N = S·D frames: seeds [N], rows [N], pose [N, H, W, 3],
    context [N, G, T, D]; no source) and ``source`` (a :class:`RetargetBatch` of the D per-shard copies of the one
    source: seeds [D], rows [D] — the reference noise key —, source [D, H, W, 3], ref_context [D, T, D])."""

    frames: Any
    source: Any


def frame_groups(x, shards: int):
    """[S·D, ...] (frame d·S + s on shard d) -> [S, D, ...]: iteration s of the per-device loop holds one frame of
    every shard (a local transpose: the shard axis keeps its devices)."""
    g = jnp.swapaxes(x.reshape((shards, x.shape[0] // shards) + x.shape[1:]), 0, 1)
    return with_logical_constraint(g, (None, "batch") + (None,) * (g.ndim - 2))


def ungroup(g):
    """The inverse of :func:`frame_groups`: [S, D, ...] -> [S·D, ...]."""
    x = jnp.swapaxes(g, 0, 1)
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """float [..., 3] in [0, 1] -> uint8, rounded as :func:`pmf_jax.pipelines.images.to_pil` (the PNGs of
    ``pmf retarget``)."""
    return np.round(np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def frame_rows(count: int, start: int, independent_noise: bool) -> np.ndarray:
    """The noise index (:func:`pmf_jax.schedulers.noise.row_keys`) of frames ``start .. start+count-1``: all 0 (shared
    x_T) or the frame's own index."""
    if independent_noise:
        return np.arange(start, start + count, dtype=np.int32)
    return np.zeros(count, np.int32)


class SequencePipeline(SamplingPipeline):
    """Animates one source person along a pose sequence with the models of a :class:`RetargetPipeline`.

      seq = SequencePipeline(RetargetPipeline.from_pretrained(...))   # or SequencePipeline.from_pretrained(...)
      frames = seq(source, poses, seed=0)                              # F PIL images
      for start, images in seq.chunks(source, poses, batch_frames=8):  # streamed: uint8 [b, H, W, 3] per chunk
          ...

    The parameters are the retarget pipeline's (:attr:`params`); the static settings are its
    :class:`RetargetStatic` (:meth:`RetargetPipeline.make_static`).
    """

    def __init__(self, retarget):
        super().__init__(retarget.scheduler_config)
        self.retarget = retarget
        self.params = retarget.params
        self.vae = retarget.vae

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> "SequencePipeline":
        """As :meth:`RetargetPipeline.from_pretrained`."""
        from pmf_jax.pipelines.retarget import RetargetPipeline

        return cls(RetargetPipeline.from_pretrained(*args, **kwargs))

    @property
    def mode(self) -> str:
        return self.retarget.mode

    @property
    def native_size(self):
        return self.retarget.native_size

    # ------------------------------------------------------------------------------------------ the programs
    @staticmethod
    def shards() -> int:
        from pmf_jax.parallel import num_batch_shards

        return num_batch_shards(common.batch_mesh())

    def prologue(self, static: RetargetStatic, params, batch: SequenceBatch, scalars):
        """-> ((scheduler state, x_T · init_noise_sigma [N, h, w, C]), extras): the frames' noise (stream 0 of each
        frame's key) and :meth:`RetargetPipeline.precompute` of the D source copies."""
        frames = batch.frames
        keys = noise_lib.row_keys(frames.seeds, frames.rows)
        x_T = noise_lib.row_normal(keys, noise_lib.INITIAL_STREAM, static.latent_shape)
        state = static.scheduler.init_state(static.steps, x_T)
        x = (x_T * state.init_noise_sigma).astype(x_T.dtype)
        return (state, x), self.retarget.precompute(static, params, batch.source, scalars)

    def loop(self, static: RetargetStatic, params, batch: SequenceBatch, scalars, extras, carry, start, stop):
        """Steps [start, stop): each writes the bank once from the source (unless written by the prologue), then
        every frame reads it (one frame per device at a time)."""
        frames, shards = batch.frames, batch.source.rows.shape[0]
        keys = noise_lib.row_keys(frames.seeds, frames.rows)
        per_frame = RetargetBatch(seeds=frames.seeds, rows=frames.rows, source=None, pose=frames.pose,
                                  context=frames.context, ref_context=None)

        def model(x, t):
            read = {}
            if static.reference is not None:
                read["bank"] = (extras["bank"] if "bank" in extras else self.retarget.write_bank(
                    static, params, batch.source, extras["ref_latents"], t))   # [D·G, L, C]

            def one(args):
                group, xg = args      # one frame per shard
                return self.retarget.model_fn(static, params, group, scalars, read, xg, t)

            groups = jax.tree_util.tree_map(lambda a: frame_groups(a, shards), (per_frame, x))
            return ungroup(jax.lax.map(one, groups))

        return static.scheduler.denoise(model, carry, start, stop, keys=keys)

    def epilogue(self, static: RetargetStatic, params, carry):
        """-> frames [N, H, W, 3] in [0, 1] (decoded one frame per device at a time), or the latents."""
        x = carry[1]
        if static.output_type == "latent":
            return x
        shards = self.shards()
        decode = lambda xg: self.retarget.epilogue(static, params, (None, xg))  # noqa: E731
        return ungroup(jax.lax.map(decode, frame_groups(x, shards)))

    def abstract_inputs(self, static: RetargetStatic, num_frames: int):
        """``(batch, scalars)`` of a chunk of ``num_frames`` frames (padded to the device count) as
        ShapeDtypeStructs placed as a call places them (ahead-of-time compiles, HLO checks)."""
        from pmf_jax.parallel import batch_sharding, replicated

        mesh, shards = common.batch_mesh(), self.shards()
        n = -(-num_frames // shards) * shards
        factor = common.vae_factor(self.vae)
        size = (static.latent_shape[0] * factor, static.latent_shape[1] * factor)
        context = self.retarget.prompts.context_shape
        frames = RetargetBatch.abstract(static, n, size, context).replace(source=None, ref_context=None)
        source = RetargetBatch.abstract(static, shards, size, context).replace(pose=None, context=None)
        place = lambda tree, sharding: jax.tree_util.tree_map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
        _, scalars = self.retarget.abstract_inputs(static, 1)
        return (place(SequenceBatch(frames=frames, source=source), batch_sharding(mesh)),
                place(scalars, replicated(mesh)))

    # --------------------------------------------------------------------------------------------- calling
    def chunks(self, source_image, poses: Sequence, prompt: str = "", negative_prompt: str = "",
               num_inference_steps: int = constants.DEFAULT_STEPS,
               guidance_scale: float = constants.DEFAULT_GUIDANCE_SCALE,
               appearance_guidance_scale: Optional[float] = None, controlnet_conditioning_scale: float = 1.0,
               scheduler: str = constants.DEFAULT_SCHEDULER, height: Optional[int] = None,
               width: Optional[int] = None, seed: int = 0, independent_noise: bool = False,
               batch_frames: int = DEFAULT_BATCH_FRAMES, start_frame: int = 0,
               reference_config: Optional[ReferenceConfig] = None, fit: str = "pad", pose_kind: str = "auto",
               progress: bool = False) -> Iterator[Tuple[int, np.ndarray]]:
        """Yields ``(first frame index, frames float32 [b, H, W, 3] in [0, 1])`` chunk by chunk, from frame
        ``start_frame`` (a resumed run) to the last pose (:func:`to_uint8` rounds them as PNGs are written).

        Args:
          source_image: the person (path, PIL, uint8/float array).
          poses: F pose inputs, anything :meth:`RetargetPipeline.prepare_inputs` reads (a ``PoseCondition`` of the
            output size, keypoints [18, 3] / [P, 18, 3], an OpenPose JSON path, a skeleton image), read a chunk at a
            time.
          batch_frames: frames per program run (rounded up to a multiple of the device count); the programs are
            compiled once per chunk size (a last, shorter chunk is padded to it).
          seed, independent_noise: see the module docstring.
          The other arguments: as :meth:`RetargetPipeline.__call__`.
        """
        pipe = self.retarget
        self.check_common(num_inference_steps, 1, "np")
        if isinstance(batch_frames, bool) or not isinstance(batch_frames, (int, np.integer)) or batch_frames < 1:
            raise PMFInputError(f"batch_frames={batch_frames!r} must be a positive integer")
        if appearance_guidance_scale is not None and pipe.mode == "controlnet_only":
            raise PMFInputError("appearance guidance needs a reference (mode 'acm' or 'reference_only')")
        poses = list(poses)
        if not poses:
            raise PMFInputError("the pose sequence is empty")
        if not 0 <= start_frame <= len(poses):
            raise PMFInputError(f"start_frame={start_frame} is outside the {len(poses)} frames")
        common.as_seed_list(seed, 1)   # a valid single seed
        source = load_image(source_image, "source image")
        size = resolve_size(source.shape, height, width, pipe.native_size)
        fitted, _ = pipe.prepare_inputs(source, poses[0], *size, fit=fit, pose_kind=pose_kind)
        static = pipe.make_static(size, num_inference_steps=num_inference_steps,
                                  scheduler=self.make_scheduler(scheduler),
                                  appearance_guidance=appearance_guidance_scale is not None,
                                  reference_config=reference_config, output_type="np")
        negative, positive = pipe.prompts([negative_prompt, prompt])           # [T, D] each
        by_row = {"u": negative, "c": positive, "a": positive}
        context = np.stack([by_row[row] for row in LAYOUTS[static.guidance]])  # [G, T, D]
        shards = self.shards()
        chunk = -(-int(batch_frames) // shards) * shards
        source_batch = RetargetBatch(
            seeds=np.full(shards, seed, np.uint32), rows=np.zeros(shards, np.int32),
            source=np.repeat(to_float(fitted)[None], shards, 0), pose=None, context=None,
            ref_context=np.repeat(positive[None], shards, 0))
        scalars = retarget_scalars(guidance_scale, appearance_guidance_scale, controlnet_conditioning_scale)
        for start in range(start_frame, len(poses), chunk):
            stop = min(start + chunk, len(poses))
            images = [pipe.prepare_inputs(source, p, *size, fit=fit, pose_kind=pose_kind)[1]
                      for p in poses[start:stop]]
            count = len(images)
            images += images[-1:] * (chunk - count)   # the last chunk padded: one program per chunk size
            frames = RetargetBatch(
                seeds=np.full(chunk, seed, np.uint32), rows=frame_rows(chunk, start, independent_noise),
                source=None, pose=np.stack([to_float(p) for p in images]),
                context=np.repeat(context[None], chunk, 0), ref_context=None)
            out = self.run_programs(static, SequenceBatch(frames=frames, source=source_batch), scalars,
                                    progress=progress, desc=f"animate frames {start}-{stop - 1} ({pipe.mode})")
            yield start, out[:count]

    def __call__(self, source_image, poses: Sequence, output_type: str = "pil", **kwargs):
        """All frames at once: F PIL images (``output_type="pil"``) or uint8 [F, H, W, 3] (``"np"``); the arguments
        as :meth:`chunks`."""
        if output_type not in ("pil", "np"):
            raise PMFInputError(f"output_type={output_type!r} must be 'pil' or 'np'")
        frames = to_uint8(np.concatenate([images for _, images in self.chunks(source_image, poses, **kwargs)]))
        if output_type == "np":
            return frames
        from PIL import Image

        return [Image.fromarray(f) for f in frames]


__all__ = ["DEFAULT_BATCH_FRAMES", "SequenceBatch", "SequencePipeline", "frame_groups", "frame_rows", "to_uint8",
           "ungroup"]
