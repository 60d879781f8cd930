"""``pmf retarget``: the source person in a target pose; writes result PNGs, a grid (source | pose | results) and
the settings as JSON."""

from __future__ import annotations

import argparse

from pmf_jax.commands import model_options, options
from pmf_jax.commands.pose import add_fit_argument, add_pose_input_arguments, pose_condition_from_args
from pmf_jax.constants import POSE_KINDS
from pmf_jax.out_folder import add_out_arguments, check_out_folder, staged_folder
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.images import check_resolution, describe_size, image_row, load_image, resolve_size
from pmf_jax.pipelines.memory import memory_limit_setting


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "retarget", help="generate the source person in a target pose",
        description="Generates the person of --source in the pose of --pose with a Stable Diffusion model, an "
                    "OpenPose ControlNet and (modes acm / reference_only) the reference bank. Writes "
                    "result_XX.png, pose.png, grid.png (source | pose | results) and settings.json into --out.")
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
    add_out_arguments(p, "output folder")
    options.add_runtime_args(p)
    return p


def run(args) -> int:
    # Check the inputs (and prepare the pose) before loading JAX and the models.
    check_resolution(args.height, args.width)
    memory_limit_setting()  # a bad $PMF_JAX_MEMORY_LIMIT_BYTES is an input error before anything loads
    model_options.check_model_arguments(args)
    out = check_out_folder(args.out, args.overwrite)
    source = load_image(args.source, "--source")
    from pmf_jax.io.hub import resolve_folder

    folder = resolve_folder(args.model)
    native = native_size(folder)   # the model's own files say its size and (an export) its sampling defaults
    size = resolve_size(source.shape, args.height, args.width, native)
    sampling = resolve_sampling(folder, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale)
    pose = pose_condition_from_args(args, source, size)
    print(describe_size(size, args.height, native), flush=True)

    import dataclasses

    pipe = model_options.build_pipeline(args)
    reference = model_options.reference_config(pipe, args)
    fitted, _ = pipe.prepare_inputs(source, pose, *size, fit=args.pose_fit)
    images = pipe(source, pose, prompt=args.prompt, negative_prompt=args.negative_prompt,
                  num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                  appearance_guidance_scale=args.appearance_guidance_scale,
                  controlnet_conditioning_scale=args.controlnet_scale, scheduler=sampling["scheduler"], height=size[0],
                  width=size[1], num_images=args.num_images, seed=args.seed, reference_config=reference,
                  fit=args.pose_fit, progress=not args.no_progress)
    paths = [out / f"result_{i:02d}.png" for i in range(len(images))]
    with staged_folder(out, args.overwrite) as stage:  # --out appears (or is replaced) only when complete
        for path, image in zip(paths, images):
            image.save(stage / path.name)
        image_row([pose.image]).save(stage / "pose.png")
        image_row([fitted, pose.image] + images).save(stage / "grid.png")
        options.write_settings(stage / "settings.json", args, resolved_height=size[0], resolved_width=size[1],
                               pose_input=pose.kind, outputs=[p.name for p in paths], resolved_mode=pipe.mode,
                               resolved_reference=dataclasses.asdict(reference), resolved_sampling=sampling)
    print(f"wrote {len(paths)} images, pose.png, grid.png and settings.json to {out}")
    return 0
