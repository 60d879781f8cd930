"""``pmf enhance``: edit an image by a text instruction (InstructPix2Pix), optionally only inside a mask; writes the
image and its settings (and the mask)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from pmf_jax.commands import options
from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE
from pmf_jax.errors import PMFInputError
from pmf_jax.out_folder import check_out_file, staged_file
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.enhance_mask import MASK_MODES, check_mask_argument, read_user_mask
from pmf_jax.pipelines.images import check_resolution, describe_size, load_image, resolve_size
from pmf_jax.pipelines.memory import memory_limit_setting

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "enhance", help="edit an image by a text instruction (InstructPix2Pix)",
        description="Applies --instruction to --image with an InstructPix2Pix model (8-channel UNet) and writes the "
                    "result to --out, with the settings beside it (same name, .json) and, with --mask, the mask "
                    "(same name + _mask.png).")
    p.add_argument("--model", required=True, help="InstructPix2Pix folder or cached Hub repo id")
    p.add_argument("--image", required=True, help="input image")
    p.add_argument("--instruction", required=True, help="what to change, e.g. 'make it a watercolor'")
    p.add_argument("--mask", metavar="MODE|PNG", default="none",
                   help=f"where to edit: {', '.join(MASK_MODES)} (none: the whole image; person: the skeleton of "
                        f"--pose, dilated, the background kept; attention: where the instruction's words attend, a "
                        f"second sampling pass) or a mask image of --image's size (white = edit); default none")
    p.add_argument("--pose", help="with --mask person: the person's pose on --image (OpenPose JSON or skeleton image, "
                                  "as pmf retarget --pose; a photo goes through the OpenPose detector)")
    options.add_sampling_args(p)
    p.add_argument("--guidance-scale", type=float,
                   help=f"text guidance (default: the model's pmf_config.json, else {DEFAULT_GUIDANCE_SCALE})")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance (default: %(default)s)")
    p.add_argument("--out", required=True, help=f"output image file ({', '.join(IMAGE_SUFFIXES)}); the settings go "
                                                 f"beside it (.json). Existing files are replaced when the run "
                                                 f"completes")
    options.add_runtime_args(p)
    return p


def mask_path(out: Path) -> Path:
    """Where the mask of ``--out`` goes: ``<stem>_mask.png`` beside it."""
    return out.with_name(out.stem + "_mask.png")


def run(args) -> int:
    check_resolution(args.height, args.width)
    memory_limit_setting()  # a bad $PMF_JAX_MEMORY_LIMIT_BYTES is an input error before anything loads
    if args.mask == "person" and not args.pose:
        raise PMFInputError("--mask person needs --pose (the person's pose on --image)")
    if args.pose and args.mask != "person":
        raise PMFInputError("--pose is only used by --mask person")
    source = load_image(args.image, "--image")
    mask = check_mask_argument(args.mask, "--mask")
    if mask not in MASK_MODES:
        read_user_mask(mask, source.shape, source.shape[:2], name="--mask")  # the image's size or aspect ratio
    from pmf_jax import storage

    out = storage.user_path(args.out)  # a URL: each file uploaded
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise PMFInputError(f"--out {str(out)!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    outputs = [out, out.with_suffix(".json")] + ([mask_path(out)] if mask != "none" else [])
    for path in outputs:  # before the model loads: a folder, a read-only location
        check_out_file(path)

    from pmf_jax.io.hub import resolve_folder

    folder = resolve_folder(args.model)
    if mask == "attention" and not (folder / "text_encoder").is_dir():
        raise PMFInputError(f"--mask attention reads where the instruction's words attend: {args.model} has no "
                            f"text_encoder/")
    native = native_size(folder)
    size = resolve_size(source.shape, args.height, args.width, native)
    sampling = resolve_sampling(folder, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale)
    pose = None
    if mask == "person":
        from pmf_jax.pose.inputs import resolve_pose

        pose = resolve_pose(args.pose, size, "pad")   # fitted as the image is (EnhancePipeline's fit "pad")
    print(describe_size(size, args.height, native), flush=True)

    from pmf_jax.pipelines import EnhancePipeline

    pipe = EnhancePipeline.from_pretrained(args.model, **options.runtime_kwargs(args))
    (image,), (mask_image,) = pipe(source, args.instruction, negative_prompt=args.negative_prompt,
                                   num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                                   image_guidance_scale=args.image_guidance_scale, scheduler=sampling["scheduler"],
                                   height=size[0], width=size[1], seed=args.seed, mask=mask, pose=pose,
                                   return_mask=True, progress=not args.no_progress)
    with contextlib.ExitStack() as stack:  # every file written whole, or none
        staged = [stack.enter_context(staged_file(path)) for path in outputs]
        image.save(staged[0])
        extra = {}
        if mask != "none":
            mask_image.save(staged[2])
            extra["mask_output"] = outputs[2].name
        options.write_settings(staged[1], args, output_size=[image.height, image.width],
                               resolved_height=size[0], resolved_width=size[1], resolved_sampling=sampling, **extra)
    print(f"wrote {', '.join(str(p) for p in outputs[:1] + outputs[2:])}")
    return 0
