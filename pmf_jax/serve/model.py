"""The model behind ``pmf serve``: loaded once, compiled once at start (:meth:`ServedModel.warm_up`), shared by every
request. A request runs exactly what ``pmf retarget`` runs: the same pipeline (built from the same flags,
:mod:`pmf_jax.commands.model_options`), the same size and sampling defaults (:mod:`pmf_jax.pipelines.defaults`) and
the same pose resolution (:func:`pmf_jax.pose.inputs.resolve_pose`).

A request may pick another mode than the model's: a pipeline per mode is made on first use from the same modules and
parameter arrays (nothing is loaded or copied again). Each new static setting (size, steps, scheduler, mode, batch)
compiles once; later requests with it reuse the program.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from pmf_jax import constants
from pmf_jax.errors import PMFInputError
from pmf_jax.pose import detect
from pmf_jax.pose.inputs import PoseCondition, resolve_pose
from pmf_jax.serve.request_form import RetargetRequest
from pmf_jax.serve.standing_pose import standing_pose

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Generation:
    """What one request produced: ``images`` (PIL, N), the ``pose`` condition on the output canvas, the resolved
    ``settings`` and the generation's ``seconds``."""

    images: List
    pose: PoseCondition
    settings: Dict
    seconds: float


class ServedModel:
    """The pipeline of ``pmf serve``'s flags (``args``: the parsed command line) and the server's defaults."""

    def __init__(self, args):
        from pmf_jax.commands import model_options
        from pmf_jax.io.hub import resolve_folder
        from pmf_jax.pipelines.defaults import native_size, resolve_sampling

        self.args = args
        self.folder = resolve_folder(args.model)
        self.native = native_size(self.folder)
        self.sampling = resolve_sampling(self.folder, scheduler=args.scheduler, steps=args.steps,
                                         guidance_scale=args.guidance_scale)
        self.pipe = model_options.build_pipeline(args)
        self.reference = model_options.reference_config(self.pipe, args)
        self._pipelines = {self.pipe.mode: self.pipe}
        self._detector = None
        self.examples = find_examples(args.examples, self.folder)

    # -------------------------------------------------------------------------------------------------- about
    @property
    def modes(self) -> List[str]:
        """The modes a request may ask for: acm only when the model has a reference UNet, ip_adapter only when the
        server was started in it (its IP-Adapter and image encoder loaded)."""
        return [m for m in constants.MODES if (m != "acm" or self.pipe.reference_unet is not None)
                and (m != "ip_adapter" or self.pipe.mode == "ip_adapter")]

    @property
    def has_text_encoder(self) -> bool:
        return self.pipe.prompts.text_encoder is not None

    def detector_available(self) -> bool:
        """Whether the OpenPose detector's weights are where ``--detector-weights`` says (nothing is loaded)."""
        try:
            detect.find_detector_weights(self.args.detector_weights)
        except PMFInputError:
            return False
        return True

    def default_size(self, source_shape=(512, 512)):
        """(H, W) of a request without height/width: ``--height``/``--width``, else as ``pmf retarget`` chooses."""
        from pmf_jax.pipelines.images import resolve_size

        return resolve_size(source_shape, self.args.height, self.args.width, self.native)

    def info(self) -> Dict:
        """What the page needs to know: defaults, modes, size, examples, whether prompts and detection work."""
        return {"model": str(self.args.model), "mode": self.pipe.mode, "modes": self.modes,
                "size": list(self.default_size()), "sampling": dict(self.sampling), "seed": self.args.seed,
                "negative_prompt": self.args.negative_prompt, "text_encoder": self.has_text_encoder,
                "detector": self.detector_available(), "examples": sorted(self.examples),
                "schedulers": list(constants.SCHEDULER_NAMES)}

    # ------------------------------------------------------------------------------------------------- running
    def pipeline(self, mode: Optional[str]):
        """The pipeline of ``mode`` (None: the model's), sharing the loaded modules and parameters."""
        mode = mode or self.pipe.mode
        if mode not in self.modes:
            raise PMFInputError(f"mode {mode!r} needs a reference UNet, which this model has not (modes: "
                                f"{', '.join(self.modes)})")
        if mode not in self._pipelines:
            from pmf_jax.pipelines import RetargetPipeline

            base, params = self.pipe, self.pipe.params
            prompts = base.prompts
            text = (prompts.text_encoder, prompts.params) if prompts.text_encoder is not None else None
            self._pipelines[mode] = RetargetPipeline(
                (base.unet, params["unet"]), (base.controlnet, params["controlnet"]), (base.vae, params["vae"]), text,
                prompts.tokenizer, (base.reference_unet, params["reference"]) if mode == "acm" else None, mode,
                base.scheduler_config, context=None if text else prompts.context,
                reference_config=base.reference_config, native_size=base.native_size)
        return self._pipelines[mode]

    def compiled_programs(self) -> int:
        """Programs compiled so far, over the pipelines of every mode used."""
        return sum(pipe.compiled_programs() for pipe in self._pipelines.values())

    def detect(self, source: np.ndarray) -> np.ndarray:
        """float32 ``[P, 18, 3]``: the people the OpenPose detector finds in ``source`` (uint8 ``[H, W, 3]``)."""
        return detect.detect_poses(source, self.detector()).body

    def detector(self):
        """The OpenPose detector, loaded on first use."""
        if self._detector is None:
            self._detector = detect.load_detector(self.args.detector_weights)
        return self._detector

    def generate(self, request: RetargetRequest, on_step: Optional[Callable[[int, int], None]] = None) -> Generation:
        """Runs one request (on the generation queue's thread). Raises PMFInputError for inputs the model refuses."""
        from pmf_jax.pipelines.images import resolve_size

        start = time.monotonic()
        pipe = self.pipeline(request.mode)
        if request.height is not None:
            size = resolve_size(request.source.shape, request.height, request.width, self.native)
        else:
            size = self.default_size(request.source.shape)
        sampling = {"steps": request.steps or self.sampling["steps"],
                    "scheduler": request.scheduler or self.sampling["scheduler"],
                    "guidance_scale": (self.sampling["guidance_scale"] if request.guidance_scale is None
                                       else request.guidance_scale)}
        seed = self.args.seed if request.seed is None else request.seed
        pose = resolve_pose(request.pose, size, request.pose_fit, request.pose_kind,
                            pose_size=request.pose_frame if request.keypoints is not None else None,
                            align_to=request.source if request.align_skeleton else None,
                            detector=self.detector() if self._needs_detector(request) else None)
        images = pipe(request.source, pose, prompt=request.prompt,
                      negative_prompt=request.negative_prompt or self.args.negative_prompt,
                      num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance_scale"],
                      appearance_guidance_scale=request.appearance_guidance_scale,
                      controlnet_conditioning_scale=request.controlnet_scale, scheduler=sampling["scheduler"],
                      height=size[0], width=size[1], num_images=request.num_images, seed=seed,
                      reference_config=self.reference, fit=request.pose_fit, progress=on_step or True)
        settings = dict(sampling, mode=pipe.mode, seed=seed, height=size[0], width=size[1],
                        num_images=request.num_images, prompt=request.prompt,
                        negative_prompt=request.negative_prompt or self.args.negative_prompt,
                        appearance_guidance_scale=request.appearance_guidance_scale,
                        controlnet_scale=request.controlnet_scale, align_skeleton=request.align_skeleton,
                        pose_fit=request.pose_fit, pose_input=pose.kind)
        return Generation(images, pose, settings, time.monotonic() - start)

    def _needs_detector(self, request: RetargetRequest) -> bool:
        if request.align_skeleton:
            return True
        image = request.pose if request.keypoints is None else None
        return image is not None and request.pose_kind != "skeleton" and not detect.is_skeleton_image(image)

    def warm_up(self) -> Generation:
        """Generates once with the defaults (a grey source, the standing pose), so that the programs of a default
        request are compiled before the first one arrives."""
        height, width = self.default_size()
        source = np.full((height, width, 3), 127, np.uint8)
        request = RetargetRequest(source=source, pose=standing_pose(height, width)[None], pose_frame=(height, width))
        return self.generate(request, on_step=lambda done, total: None)


def find_examples(pattern: Optional[str], model_folder: Path) -> Dict[str, Path]:
    """name -> image file of the example sources the page offers: the files ``--examples`` (a folder or a glob)
    names, else ``test_source*.png`` beside the model folder (where ``make demo`` writes its held-out source)."""
    if pattern:
        given = Path(pattern).expanduser()
        paths = sorted(given.iterdir()) if given.is_dir() else sorted(given.parent.glob(given.name))
    else:
        paths = sorted(Path(model_folder).parent.glob("test_source*.png"))
    return {p.name: p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


__all__ = ["Generation", "IMAGE_SUFFIXES", "ServedModel", "find_examples"]
