"""The one source of every name list and fixed setting that several parts of pmf_jax share.

No JAX (or other heavy) import here: the CLI builds its argument parsers from these without starting JAX. Tests check
that the libraries agree (e.g. :data:`SCHEDULER_NAMES` = the keys of ``pmf_jax.schedulers.SCHEDULERS``).
"""

from __future__ import annotations

# How a retarget pipeline gets the reference bank (docs/architecture.md, "Modes"):
#   acm             a separate reference UNet (the trained Appearance Control Module) writes it;
#   reference_only  the denoising UNet's own weights write it (training-free, stock SD1.5);
#   controlnet_only no reference at all: a plain OpenPose ControlNet pipeline;
#   ip_adapter      no reference bank: ControlNet + IP-Adapter, the source image as the image prompt (Method 2).
MODES = ("acm", "reference_only", "controlnet_only", "ip_adapter")
DEFAULT_MODE = "acm"
DEFAULT_IP_ADAPTER_SCALE = 1.0  # diffusers' scale after load_ip_adapter

# How a target pose is read (pmf_jax.pose.inputs.resolve_pose):
#   auto       a .json file is OpenPose keypoints, an image that looks like an OpenPose skeleton is used as is, any
#              other image (photo, doodle) goes through the OpenPose detector;
#   image      the same for image files only;
#   skeleton   an image used as the skeleton as is, whatever it looks like;
#   keypoints  OpenPose JSON only.
POSE_KINDS = ("auto", "image", "skeleton", "keypoints")

# Samplers, by the names of pmf_jax.schedulers.SCHEDULERS, and the sampling defaults that the CLI and the config share.
SCHEDULER_NAMES = ("ddpm", "ddim", "euler", "dpmpp_2m", "unipc")
DEFAULT_SCHEDULER = "unipc"
DEFAULT_STEPS = 20
DEFAULT_BATCH_FRAMES = 8  # frames per program run of a pose sequence (pmf animate; SequencePipeline)
DEFAULT_GUIDANCE_SCALE = 7.5

DTYPES = ("float32", "bfloat16", "float16")
# The diffusers/torch spellings `pmf convert --dtype` takes, by the DTYPES name each stands for.
DTYPE_SHORT_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ATTENTION_BACKENDS = ("auto", "xla", "cudnn", "flash")

# Reference bank options (pmf_jax.reference.ReferenceConfig).
FUSION_BLOCKS = ("full", "midup")
REFERENCE_TIMESTEPS = ("same", "zero")
# How readers use the bank (diffusers' reference-only: reference_attn / reference_adain):
#   attn        self-attention also attends to the reference's hidden states;
#   adain       after every block layer, the hidden states take the reference's per-channel mean and variance;
#   attn+adain  both.
REFERENCE_METHODS = ("attn", "adain", "attn+adain")

# SD1.5's noise schedule: the betas the models were trained with. Training noise depends on these alone.
SD15_NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear"}
# SD1.5's scheduler config as its scheduler/scheduler_config.json gives it to a sampler (less the PNDM-only keys):
# the noise schedule plus the timestep offset of its "leading" spacing.
SD15_SCHEDULER_CONFIG = dict(SD15_NOISE_SCHEDULE, steps_offset=1)

# The most pixels (height x width) an image may have: checked from a file's header before it is decoded, and for every
# size asked of an image or a canvas (`pmf pose render`, --height x --width), so that a decompression bomb or a
# mistyped size is one clear error rather than a 30 GB allocation. 100 megapixels: a 12000x8000 photo passes; an RGB
# image that large is 300 MB decoded. The environment variable MAX_IMAGE_PIXELS_ENV, if set, replaces it.
MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_ENV = "PMF_MAX_IMAGE_PIXELS"
