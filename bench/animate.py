"""Pose sequences: ``SequencePipeline`` (the bank written once per step for a chunk of frames, one program run per
chunk) vs the per-frame loop (one ``RetargetPipeline`` call per pose — what one ``pmf retarget`` per frame does —
with the models loaded and the programs compiled once), frames per second and their ratio on the same machine.

    python bench/animate.py --tiny                       # CPU, a random demo-shaped model (64x64 pixel space, acm)
    python bench/animate.py --model /tmp/demo_export     # a trained export (e.g. `make demo`'s)

Both sides draw the same frames (shared noise): the script checks they are byte-identical, then times ``--repeats``
runs of each (after one untimed run that compiles) and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_pipeline():
    """The demo's model shape (configs/tiny_unet.json, 4x4 pixel patches, no text encoder, mode acm) with random
    weights."""
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT / "bench"))
    import models

    from pmf_jax.models.identity_vae import IdentityAutoencoder
    from pmf_jax.pipelines import RetargetPipeline

    unet = {k: v for k, v in json.loads((ROOT / "configs" / "tiny_unet.json").read_text()).items()
            if not k.startswith("_")}
    controlnet = dict({k: v for k, v in unet.items() if k not in ("up_block_types", "out_channels", "sample_size")},
                      conditioning_embedding_out_channels=(16, 32, 48))
    parts = {name: models.jax_model(kind, cfg, dtype=jnp.float32, seed=i)
             for i, (name, kind, cfg) in enumerate((("unet", "unet", unet), ("reference", "unet", unet),
                                                     ("controlnet", "controlnet", controlnet)))}
    from pmf_jax.constants import SD15_SCHEDULER_CONFIG

    return RetargetPipeline(unet=parts["unet"], controlnet=parts["controlnet"], vae=(IdentityAutoencoder(4), {}),
                            reference_unet=parts["reference"], mode="acm", scheduler_config=SD15_SCHEDULER_CONFIG)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU, the demo-shaped random model (the CI smoke mode)")
    p.add_argument("--model", help="an export folder instead of the random model")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-frames", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from pmf_jax import runtime

    runtime.setup(False)
    from data.synthetic_pairs.motion import dance
    from pmf_jax.pipelines import RetargetPipeline
    from pmf_jax.pipelines.sequence import SequencePipeline, to_uint8

    pipe = RetargetPipeline.from_pretrained(args.model) if args.model else tiny_pipeline()
    size = pipe.native_size or (64, 64)
    seq = SequencePipeline(pipe)
    poses = dance(args.frames, size[0], seed=0)
    source = np.random.default_rng(0).integers(0, 256, size + (3,), np.uint8)
    kw = dict(num_inference_steps=args.steps, scheduler="ddim", height=size[0], width=size[1], guidance_scale=1.0)

    def per_frame():
        return to_uint8(np.stack([pipe(source, pose, seed=0, output_type="np", **kw)[0] for pose in poses]))

    def sequence():
        return seq(source, poses, seed=0, batch_frames=args.batch_frames, output_type="np", **kw)

    loop_frames, seq_frames = per_frame(), sequence()   # compile both
    identical = bool(np.array_equal(loop_frames, seq_frames))
    times = {"per_frame": [], "sequence": []}
    for _ in range(args.repeats):   # interleaved, so a shared host's load drifts over both alike
        for name, fn in (("per_frame", per_frame), ("sequence", sequence)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    fps = {name: args.frames / statistics.median(t) for name, t in times.items()}
    result = {"device": str(jax.devices()[0].device_kind), "model": args.model or "tiny (random, demo-shaped)",
              "frames": args.frames, "steps": args.steps, "batch_frames": args.batch_frames,
              "per_frame_fps": fps["per_frame"], "sequence_fps": fps["sequence"],
              "ratio": fps["sequence"] / fps["per_frame"], "byte_identical": identical,
              "seconds": times}
    print(f"{args.frames} frames x {args.steps} steps at {size[0]}x{size[1]} on {result['device']}: "
          f"per-frame loop {fps['per_frame']:.2f} frames/s, sequence {fps['sequence']:.2f} frames/s, "
          f"ratio {result['ratio']:.2f}x; frames byte-identical: {identical}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
