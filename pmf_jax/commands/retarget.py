"""``pmf retarget``: the source person in a target pose; writes result PNGs, a grid (source | pose | results) and
the settings as JSON. With ``--enhance INSTRUCTION`` every result is then edited by InstructPix2Pix in the same
process (:class:`~pmf_jax.pipelines.PMFPipeline`), optionally only inside a mask, and written beside it."""

from __future__ import annotations

import argparse

from pmf_jax.commands import model_options, options
from pmf_jax.commands.pose import add_fit_argument, add_pose_input_arguments, pose_condition_from_args
from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE, POSE_KINDS
from pmf_jax.errors import PMFInputError
from pmf_jax.out_folder import add_out_arguments, check_out_folder, staged_folder
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.enhance_mask import MASK_MODES, check_mask_argument, read_user_mask
from pmf_jax.pipelines.images import check_resolution, describe_size, image_row, load_image, resolve_size
from pmf_jax.pipelines.memory import memory_limit_setting

IMAGE_GUIDANCE_SCALE = 1.5  # InstructPix2Pix's image guidance by default (as pmf enhance)
# the enhancement flags that mean nothing without --enhance
ENHANCE_FLAGS = ("enhance_model", "enhance_mask", "image_guidance_scale", "enhance_guidance_scale")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "retarget", help="generate the source person in a target pose",
        description="Generates the person of --source in the pose of --pose with a Stable Diffusion model, an "
                    "OpenPose ControlNet and (modes acm / reference_only) the reference bank. Writes "
                    "result_XX.png, pose.png, grid.png (source | pose | results) and settings.json into --out; with "
                    "--enhance also enhanced_XX.png (each result edited by InstructPix2Pix) and, with "
                    "--enhance-mask, mask_XX.png (white: where it was edited).")
    model_options.add_model_arguments(p)
    inputs = p.add_argument_group("inputs")
    inputs.add_argument("--source", required=True, help="source image (the person to redraw)")
    inputs.add_argument("--pose", required=True,
                        help="target pose: OpenPose JSON, an OpenPose skeleton image, or a photo / doodle (detected)")
    inputs.add_argument("--pose-kind", choices=POSE_KINDS, default="auto",
                        help="auto: a .json file is keypoints, an image that looks like an OpenPose skeleton is used "
                             "as is and any other image (photo, doodle) goes through the OpenPose detector; image: "
                             "the same for image files only; skeleton: use the image as is, whatever it looks like; "
                             "keypoints: OpenPose JSON only")
    add_pose_input_arguments(inputs)
    add_fit_argument(inputs)
    inputs.add_argument("--prompt", default="", help="text prompt (style; default: empty)")
    sampling = p.add_argument_group("sampling")
    options.add_sampling_args(sampling)
    sampling.add_argument("--num-images", type=options.positive_int, default=4, help="(default: %(default)s)")
    options.add_guidance_args(sampling)
    model_options.add_reference_arguments(p)
    add_enhance_arguments(p)
    add_out_arguments(p, "output folder")
    options.add_runtime_args(p)
    return p


def add_enhance_arguments(parser) -> None:
    enhance = parser.add_argument_group(
        "enhancement", "edit every result by a text instruction with InstructPix2Pix after the retarget (same "
                       "process, same --steps, --scheduler and --seed; enhanced_XX.png)")
    enhance.add_argument("--enhance", metavar="INSTRUCTION", help="what to change, e.g. 'make it a watercolor'")
    enhance.add_argument("--enhance-model", metavar="FOLDER",
                         help="InstructPix2Pix folder or cached Hub repo id (default: the --model folder's enhance/ "
                              "subfolder; one of the two is required with --enhance)")
    enhance.add_argument("--enhance-mask", metavar="MODE|PNG",
                         help=f"where to edit: {', '.join(MASK_MODES)} (default none: the whole image; person: the "
                              f"target pose's skeleton, dilated, the background kept; attention: where the "
                              f"instruction's words attend, a second sampling pass) or a mask image of the results' "
                              f"size (white = edit); written as mask_XX.png")
    enhance.add_argument("--image-guidance-scale", type=float,
                         help=f"how closely the enhancement keeps the result (default: {IMAGE_GUIDANCE_SCALE})")
    enhance.add_argument("--enhance-guidance-scale", type=float,
                         help=f"the enhancement's text guidance (default: the enhancement model's pmf_config.json, "
                              f"else {DEFAULT_GUIDANCE_SCALE})")


def check_enhance_flags(args) -> None:
    """The enhancement flags' combinations (one line, before anything is read)."""
    if args.enhance is None:
        given = [name for name in ENHANCE_FLAGS if getattr(args, name) is not None]
        if given:
            raise PMFInputError(f"--{given[0].replace('_', '-')} needs --enhance INSTRUCTION")
    elif not args.enhance.strip():
        raise PMFInputError("--enhance: give the instruction, e.g. --enhance 'make it a watercolor'")


def enhance_settings(args, folder, size):
    """What the enhancement uses, checked before any model loads (None without --enhance): its model folder, mask
    (a mode or a checked mask image), sampling and guidance."""
    from pmf_jax.pipelines.pmf import find_enhance_model

    if args.enhance is None:
        return None
    model = find_enhance_model(folder, args.enhance_model)
    mask = check_mask_argument(args.enhance_mask or "none", "--enhance-mask")
    if mask == "attention" and not (model / "text_encoder").is_dir():
        raise PMFInputError(f"--enhance-mask attention reads where the instruction's words attend: {model} has no "
                            f"text_encoder/")
    if mask not in MASK_MODES:
        read_user_mask(mask, size, size, name="--enhance-mask")  # the results' size or aspect ratio, not all black
    sampling = resolve_sampling(model, scheduler=args.scheduler, steps=args.steps,
                                guidance_scale=args.enhance_guidance_scale)
    image_guidance = IMAGE_GUIDANCE_SCALE if args.image_guidance_scale is None else args.image_guidance_scale
    return {"model": model, "mask": mask, "sampling": sampling, "image_guidance_scale": image_guidance}


def run(args) -> int:
    # Check the inputs (and prepare the pose) before loading JAX and the models.
    check_resolution(args.height, args.width)
    memory_limit_setting()  # a bad $PMF_JAX_MEMORY_LIMIT_BYTES is an input error before anything loads
    model_options.check_model_arguments(args)
    check_enhance_flags(args)
    out = check_out_folder(args.out, args.overwrite)
    source = load_image(args.source, "--source")
    from pmf_jax.io.hub import resolve_folder

    folder = resolve_folder(args.model)
    native = native_size(folder)   # the model's own files say its size and (an export) its sampling defaults
    size = resolve_size(source.shape, args.height, args.width, native)
    sampling = resolve_sampling(folder, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale)
    enhancement = enhance_settings(args, folder, size)
    pose = pose_condition_from_args(args, source, size)
    print(describe_size(size, args.height, native), flush=True)

    import dataclasses

    from pmf_jax.pipelines import EnhancePipeline, PMFPipeline

    pipe = model_options.build_pipeline(args)
    enhancer = (EnhancePipeline.from_pretrained(enhancement["model"], **options.runtime_kwargs(args))
                if enhancement else None)
    reference = model_options.reference_config(pipe, args)
    fitted, _ = pipe.prepare_inputs(source, pose, *size, fit=args.pose_fit)
    enhance_kwargs = {}
    if enhancement:
        enhance_kwargs = dict(enhance=args.enhance, enhance_mask=enhancement["mask"],
                              enhance_guidance_scale=enhancement["sampling"]["guidance_scale"],
                              image_guidance_scale=enhancement["image_guidance_scale"],
                              enhance_steps=enhancement["sampling"]["steps"],
                              enhance_scheduler=enhancement["sampling"]["scheduler"])
    result = PMFPipeline(pipe, enhancer)(
        source, pose, prompt=args.prompt, negative_prompt=args.negative_prompt,
        num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
        appearance_guidance_scale=args.appearance_guidance_scale, controlnet_conditioning_scale=args.controlnet_scale,
        scheduler=sampling["scheduler"], height=size[0], width=size[1], num_images=args.num_images, seed=args.seed,
        reference_config=reference, fit=args.pose_fit, progress=not args.no_progress, **enhance_kwargs)
    images = result.images
    paths = [out / f"result_{i:02d}.png" for i in range(len(images))]
    written, extra = [f"{len(paths)} images"], {}
    with staged_folder(out, args.overwrite) as stage:  # --out appears (or is replaced) only when complete
        for path, image in zip(paths, images):
            image.save(stage / path.name)
        if enhancement:
            enhanced = [f"enhanced_{i:02d}.png" for i in range(len(result.enhanced))]
            for name, image in zip(enhanced, result.enhanced):
                image.save(stage / name)
            masks = []
            if enhancement["mask"] != "none":  # white: where the enhancement edited
                masks = [f"mask_{i:02d}.png" for i in range(len(result.masks))]
                for name, mask in zip(masks, result.masks):
                    mask.save(stage / name)
            written += [f"{len(enhanced)} enhanced images"] + ([f"{len(masks)} masks"] if masks else [])
            extra["resolved_enhance"] = dict(enhancement, model=str(enhancement["model"]),
                                             mask=str(enhancement["mask"]), outputs=enhanced, masks=masks)
        image_row([pose.image]).save(stage / "pose.png")
        image_row([fitted, pose.image] + images).save(stage / "grid.png")
        options.write_settings(stage / "settings.json", args, resolved_height=size[0], resolved_width=size[1],
                               pose_input=pose.kind, outputs=[p.name for p in paths], resolved_mode=pipe.mode,
                               resolved_reference=dataclasses.asdict(reference), resolved_sampling=sampling, **extra)
    print(f"wrote {', '.join(written)}, pose.png, grid.png and settings.json to {out}")
    return 0
