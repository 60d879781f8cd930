"""``pmf enhance``: edit an image by a text instruction (InstructPix2Pix); writes the image and its settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from pmf_jax.commands import options
from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE
from pmf_jax.errors import PMFInputError
from pmf_jax.out_folder import check_out_file, staged_file
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.images import check_resolution, describe_size, load_image, resolve_size
from pmf_jax.pipelines.memory import memory_limit_setting

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
    p.add_argument("--guidance-scale", type=float,
                   help=f"text guidance (default: the model's pmf_config.json, else {DEFAULT_GUIDANCE_SCALE})")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"output image file ({', '.join(IMAGE_SUFFIXES)}); the settings go "
                                                 f"beside it (.json). Existing files are replaced when the run "
                                                 f"completes")
    options.add_runtime_args(p)
    return p


def run(args) -> int:
    check_resolution(args.height, args.width)
    memory_limit_setting()  # a bad $PMF_JAX_MEMORY_LIMIT_BYTES is an input error before anything loads
    source = load_image(args.image, "--image")
    out = Path(args.out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise PMFInputError(f"--out {str(out)!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    for path in (out, out.with_suffix(".json")):  # before the model loads: a folder, a read-only location
        check_out_file(path)

    from pmf_jax.io.hub import resolve_folder

    folder = resolve_folder(args.model)
    native = native_size(folder)
    size = resolve_size(source.shape, args.height, args.width, native)
    sampling = resolve_sampling(folder, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale)
    print(describe_size(size, args.height, native), flush=True)

    from pmf_jax.pipelines import EnhancePipeline

    pipe = EnhancePipeline.from_pretrained(args.model, **options.runtime_kwargs(args))
    (image,) = pipe(args.image, args.instruction, negative_prompt=args.negative_prompt,
                    num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                    image_guidance_scale=args.image_guidance_scale, scheduler=sampling["scheduler"], height=size[0],
                    width=size[1], seed=args.seed, progress=not args.no_progress)
    with staged_file(out) as image_tmp, staged_file(out.with_suffix(".json")) as settings_tmp:
        image.save(image_tmp)
        options.write_settings(settings_tmp, args, output_size=[image.height, image.width],
                               resolved_height=size[0], resolved_width=size[1], resolved_sampling=sampling)
    print(f"wrote {out}")
    return 0
