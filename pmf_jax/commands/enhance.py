"""``pmf enhance``: edit an image by a text instruction (InstructPix2Pix); writes the image and its settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmf_jax.commands import options
from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.images import check_resolution, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "enhance", help="edit an image by a text instruction (InstructPix2Pix)",
        description="Applies --instruction to --image with an InstructPix2Pix model (8-channel UNet) and writes the "
                    "result to --out, with the settings beside it (same name, .json).")
    p.add_argument("--model", required=True, help="InstructPix2Pix folder or cached Hub repo id")
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--instruction", required=True, help="what to change, e.g. 'make it a watercolor'")
    options.add_sampling_args(p)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE,
                   help="text guidance (default: %(default)s)")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"output image file ({', '.join(IMAGE_SUFFIXES)})")
    options.add_runtime_args(p)
    return p


def run(args) -> int:
    check_resolution(args.height, args.width)
    load_image(args.image, "--image")
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise PMFInputError(f"--out {str(out)!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")

    from pmf_jax.pipelines import EnhancePipeline

    pipe = EnhancePipeline.from_pretrained(args.model, **options.runtime_kwargs(args))
    (image,) = pipe(args.image, args.instruction, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
                    scheduler=args.scheduler, height=args.height, width=args.width, seed=args.seed,
                    progress=not args.no_progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    options.write_settings(out.with_suffix(".json"), args, output_size=[image.height, image.width])
    print(f"wrote {out}")
    return 0
