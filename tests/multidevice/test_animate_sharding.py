"""SequencePipeline on 8 virtual CPU devices: the frames are split over the devices (one each), the bank written
from the one source is read by every frame as on one device (within 1e-5 of the retarget programs run frame by
frame on one device), and the compiled loop gathers no activation (no bank-sized all-gather).

Run by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).
"""

import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: parity helpers and the pixel models

from parity import rel_err  # noqa: E402
from test_identity_vae import SCHEDULE, SIZE, build_pixel_models, pixel_inputs  # noqa: E402

from pmf_jax.parallel import param_piece_shapes, unexpected_all_gathers  # noqa: E402
from pmf_jax.pipelines import RetargetBatch, RetargetPipeline  # noqa: E402
from pmf_jax.pipelines.common import batch_mesh  # noqa: E402
from pmf_jax.pipelines.images import to_float  # noqa: E402
from pmf_jax.pipelines.retarget_inputs import LAYOUTS, retarget_scalars  # noqa: E402
from pmf_jax.pipelines.sequence import SequencePipeline  # noqa: E402
from pmf_jax.reference import ReferenceConfig  # noqa: E402

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/run_all.sh (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
                allow_module_level=True)

FRAMES, SEED, GUIDANCE = 5, 3, 2.5


def _one_device_frames(pipe, static, source, poses):
    """Each frame by the retarget programs, jitted without a mesh on device 0, one frame per call."""
    prologue, loop, epilogue = (jax.jit(f) for f in pipe.programs(static))
    negative, positive = pipe.prompts(["", ""])
    rows = {"u": negative, "c": positive, "a": positive}
    scalars = retarget_scalars(GUIDANCE, None, 1.0)
    out = []
    with jax.default_device(jax.devices()[0]):
        for pose in poses:
            batch = RetargetBatch(seeds=np.full(1, SEED, np.uint32), rows=np.zeros(1, np.int32),
                                  source=to_float(source)[None], pose=to_float(pose)[None],
                                  context=np.stack([rows[r] for r in LAYOUTS[static.guidance]])[None],
                                  ref_context=positive[None])
            carry, extras = prologue(pipe.params, batch, scalars)
            carry = loop(pipe.params, batch, scalars, extras, carry, np.int32(0), np.int32(static.steps))
            out.append(np.asarray(epilogue(pipe.params, carry))[0])
    return np.stack(out)


def test_frames_split_over_eight_devices_read_one_bank(tmp_path):
    jax.config.update("jax_default_matmul_precision", "highest")
    models = build_pixel_models(tmp_path)
    pipe = RetargetPipeline(*models[:2], reference_unet=models[2], mode="acm", scheduler_config=SCHEDULE)
    seq = SequencePipeline(pipe)
    sources, poses, _ = pixel_inputs(FRAMES, seed=2)
    config = ReferenceConfig(style_fidelity=0.5, reference_timestep="same")
    kw = dict(num_inference_steps=2, guidance_scale=GUIDANCE, scheduler="ddim", reference_config=config,
              height=SIZE, width=SIZE, pose_kind="skeleton", seed=SEED)
    got = np.concatenate([f for _, f in seq.chunks(sources[0], list(poses), batch_frames=8, **kw)])
    static = pipe.make_static((SIZE, SIZE), num_inference_steps=2, scheduler="ddim", reference_config=config,
                              output_type="np")
    assert got.shape == (FRAMES, SIZE, SIZE, 3)
    assert rel_err(got, _one_device_frames(pipe, static, sources[0], poses)) <= 1e-5
    assert np.abs(got[1:] - got[:1]).mean() > 1e-3   # the poses differ, so do the frames

    # The frames are split over the devices, the source copied once per device; the loop gathers no activation.
    batch, scalars = seq.abstract_inputs(static, FRAMES)
    programs, params = seq.jitted_programs(static), seq.placed_params()
    prologue = programs.prologue.lower(params, batch, scalars).compile()
    carry, extras = prologue.out_info
    x = carry[1]
    assert x.shape[0] == 8 and x.sharding.shard_shape(x.shape)[0] == 1
    assert batch.source.source.sharding.shard_shape(batch.source.source.shape)[0] == 1
    step = jax.ShapeDtypeStruct((), np.int32)
    loop = programs.loop.lower(params, batch, scalars, extras, carry, step, step).compile()
    text = loop.as_text()
    assert unexpected_all_gathers(text, param_piece_shapes(params, batch_mesh())) == []
    assert "all-gather" not in text, "nothing is gathered: the parameters are replicated, the bank is local"
