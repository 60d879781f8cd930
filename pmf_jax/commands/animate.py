"""``pmf animate``: the source person driven along a pose sequence (a dance video, frames, OpenPose JSON files);
writes the clip as an MP4 and, beside it, every frame as a PNG, a side-by-side video and the settings
(:mod:`pmf_jax.video.clip`), resumable chunk by chunk."""

from __future__ import annotations

import argparse

from pmf_jax.commands import model_options, options
from pmf_jax.commands.pose import add_fit_argument
from pmf_jax.constants import DEFAULT_BATCH_FRAMES
from pmf_jax.errors import PMFInputError
from pmf_jax.out_folder import check_out_file, check_out_folder, local_only, staged_folder
from pmf_jax.pipelines.defaults import native_size, resolve_sampling
from pmf_jax.pipelines.images import check_resolution, describe_size, image_row, load_image, resolve_size
from pmf_jax.pipelines.memory import memory_limit_setting
from pmf_jax.pose.detect import DEFAULT_DETECTOR_WEIGHTS

DEFAULT_FPS = 12.0


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "animate", help="animate the source person along a pose sequence (video, frames, OpenPose JSON)",
        description="Generates the person of --source in every pose of --poses (a video, a folder of frames, a "
                    "folder of OpenPose JSON files or one sequence JSON file), the reference bank written once "
                    "from the source, frames batched over the devices. Writes --out (an MP4) and, in the folder of "
                    "the same name beside it, frames/frame_XXXXX.png, side_by_side.mp4 (driving | pose | result), "
                    "settings.json and (--gif) a GIF. An interrupted run continues from its last chunk.")
    model_options.add_model_arguments(p)
    inputs = p.add_argument_group("inputs")
    inputs.add_argument("--source", required=True, help="source image (the person to animate)")
    inputs.add_argument("--poses", required=True, metavar="DRIVING",
                        help="a video file, a folder of frames, a folder of OpenPose JSON files (sorted naturally) "
                             "or one JSON file of a sequence; video frames and photos go through the OpenPose "
                             "detector once (cached by content), skeleton images are read by their colours")
    inputs.add_argument("--frames", metavar="A:B[:step]", help="the driving frames to use (Python slice, 0-based)")
    inputs.add_argument("--align-skeleton", action="store_true",
                        help="give every pose the source person's proportions: bone scales measured once, between "
                             "the first frame and the source (OpenPose on the source image), applied to all frames")
    inputs.add_argument("--smooth-keypoints", type=non_negative_float, default=0.0, metavar="SIGMA",
                        help="Gaussian smoothing of the joint tracks over SIGMA frames (default: off)")
    inputs.add_argument("--detector-weights", default=DEFAULT_DETECTOR_WEIGHTS, metavar="PATH|ID",
                        help="OpenPose weights folder or cached Hub repo id (for video frames, photos, "
                             "--align-skeleton)")
    add_fit_argument(inputs)
    inputs.add_argument("--prompt", default="", help="text prompt (style; default: empty)")
    sampling = p.add_argument_group("sampling")
    options.add_sampling_args(sampling)
    options.add_guidance_args(sampling)
    sampling.add_argument("--batch-frames", type=options.positive_int, default=DEFAULT_BATCH_FRAMES,
                          help="frames per program run, split over the devices (default: %(default)s); the frames "
                               "do not depend on it")
    sampling.add_argument("--independent-noise", action="store_true",
                          help="each frame its own initial noise (default: one x_T shared by every frame, which "
                               "keeps consecutive frames alike)")
    model_options.add_reference_arguments(p)
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="CLIP.mp4",
                     help="the video to write (.mp4, .mov, .mkv); its folder CLIP/ beside it gets the frames, "
                          "side_by_side.mp4 and settings.json (CLIP/ must be empty or absent unless --overwrite)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing CLIP/ folder")
    out.add_argument("--fps", type=positive_float,
                     help=f"frame rate (default: the driving video's, else {DEFAULT_FPS})")
    out.add_argument("--gif", action="store_true", help="also write CLIP/CLIP.gif")
    options.add_runtime_args(p)
    return p


def read_poses(args, source, size):
    """The driving sequence and its keypoints [F, 18, 3] on the output canvas, smoothed and aligned as asked."""
    from pmf_jax.pose.sequence import FrameRange, read_driving, to_canvas
    from pmf_jax.pose.temporal import align_sequence, smooth_keypoints

    frames = FrameRange.parse(args.frames) if args.frames else None
    driving = read_driving(args.poses, frames, detector_weights=args.detector_weights,
                           progress=not args.no_progress)
    keypoints = smooth_keypoints(to_canvas(driving, size, args.pose_fit), args.smooth_keypoints)
    if args.align_skeleton:
        from pmf_jax.pose.inputs import source_keypoints_on_canvas

        person = source_keypoints_on_canvas(source, size, args.pose_fit, detector_weights=args.detector_weights)
        keypoints = align_sequence(keypoints, person)
    return driving, keypoints


def run(args) -> int:
    from pmf_jax.video.clip import check_video_out, companion_folder
    from pmf_jax.video.reader import import_av

    local_only(args.out)  # the video writer and its resumable stage write local files only
    check_resolution(args.height, args.width)
    memory_limit_setting()
    model_options.check_model_arguments(args)
    out = check_out_file(check_video_out(args.out))
    folder_out = check_out_folder(companion_folder(out), args.overwrite, flag="--out's folder")
    import_av()   # PyAV missing: one line now, not after the models load
    source = load_image(args.source, "--source")
    from pmf_jax.io.hub import resolve_folder

    model = resolve_folder(args.model)
    native = native_size(model)
    size = resolve_size(source.shape, args.height, args.width, native)
    sampling = resolve_sampling(model, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.guidance_scale)
    driving, keypoints = read_poses(args, source, size)
    fps = args.fps or driving.fps or DEFAULT_FPS
    print(describe_size(size, args.height, native), flush=True)
    print(f"{len(keypoints)} frames from {driving.kind} {str(driving.path)!r}", flush=True)

    import dataclasses

    from pmf_jax.pipelines.sequence import SequencePipeline

    pipe = model_options.build_pipeline(args)
    reference = model_options.reference_config(pipe, args)
    sequence = SequencePipeline(pipe)
    call = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=sampling["steps"],
                guidance_scale=sampling["guidance_scale"], appearance_guidance_scale=args.appearance_guidance_scale,
                controlnet_conditioning_scale=args.controlnet_scale, scheduler=sampling["scheduler"],
                height=size[0], width=size[1], seed=args.seed, independent_noise=args.independent_noise,
                reference_config=reference, fit=args.pose_fit)
    resolved = dict(resolved_height=size[0], resolved_width=size[1], resolved_mode=pipe.mode,
                    resolved_reference=dataclasses.asdict(reference), resolved_sampling=sampling, resolved_fps=fps,
                    frame_count=len(keypoints), driving_kind=driving.kind, driving_indices=list(driving.indices),
                    video=str(out))
    write_clip(args, sequence, source, keypoints, driving, call, fps, out, folder_out, resolved)
    print(f"wrote {out} ({len(keypoints)} frames at {fps:g} fps) and {folder_out}/: frames/, side_by_side.mp4, "
          f"settings.json" + (f", {out.stem}.gif" if args.gif else ""))
    return 0


def write_clip(args, sequence, source, keypoints, driving, call, fps, out, folder_out, resolved) -> None:
    """Runs the sequence chunk by chunk into the resumable stage (:class:`pmf_jax.video.clip.ClipStage`)."""
    import numpy as np

    from pmf_jax.pipelines.images import fit_image
    from pmf_jax.pose.render import line_widths_for, render_pose
    from pmf_jax.pipelines.sequence import to_uint8
    from pmf_jax.video.clip import ClipStage, fingerprint

    height, width = call["height"], call["width"]
    key = fingerprint({"model": [args.model, args.controlnet, args.reference_unet, sequence.mode],
                       "call": {k: v for k, v in call.items()}, "fps": fps}, source, keypoints)
    drivers = driving.driving_frames()

    def panel(index, result):
        driver = fit_image(next(drivers), (height, width), args.pose_fit)[0]
        pose = render_pose(keypoints[index], height, width, *line_widths_for(height, width))
        return np.asarray(image_row([driver, pose, result]))

    with staged_folder(folder_out, args.overwrite, flag="--out's folder", partial="resume") as stage_dir:
        stage = ClipStage(stage_dir, out, fps, key, len(keypoints))
        try:
            if stage.start_frame:
                print(f"resuming at frame {stage.start_frame} of {len(keypoints)} "
                      f"(the frames of {stage_dir} so far)", flush=True)
            for i in range(stage.start_frame):
                frame = stage.written_frame(i)
                stage.add(i, frame, panel(i, frame), new=False)
            for start, images in sequence.chunks(source, keypoints, batch_frames=args.batch_frames,
                                                 start_frame=stage.start_frame, progress=not args.no_progress,
                                                 **call):
                for i, frame in enumerate(to_uint8(images), start):
                    stage.add(i, frame, panel(i, frame))
                stage.chunk_done(start + len(images))
            stage.finish(lambda path: options.write_settings(path, args, **resolved), gif=args.gif)
        finally:
            stage.close()
    if not out.is_file():  # pragma: no cover - finish() renamed it
        raise PMFInputError(f"{out} was not written")
