"""The model flags of the commands that sample a retarget model (``pmf retarget``, ``pmf serve``): which folders and
mode, the IP-Adapter (:func:`add_model_arguments`), the reference-bank settings (:func:`add_reference_arguments`), and the pipeline
they build (:func:`build_pipeline`, :func:`reference_config`). No heavy imports at module level."""

from __future__ import annotations

import argparse
import dataclasses
import json

from pmf_jax.constants import FUSION_BLOCKS, MODES, REFERENCE_METHODS, REFERENCE_TIMESTEPS
from pmf_jax.errors import PMFInputError

# ReferenceConfig fields set at sampling time; a flag not given keeps the model's setting (an export's, else the default)
REFERENCE_FLAGS = ("fusion_blocks", "attention_weight", "style_fidelity", "reference_timestep", "noise_reference",
                   "controlnet_reads_reference", "method", "adain_weight")
# the argparse dest of a reference flag whose name is not the field's
_FLAG_DESTS = {"method": "reference_method"}


def add_model_arguments(parser: argparse.ArgumentParser, default_model=None) -> None:
    """``--model`` (required unless ``default_model``), ``--controlnet``, ``--reference-unet``, ``--mode``."""
    models = parser.add_argument_group("models")
    where = f" (default: {default_model})" if default_model else ""
    models.add_argument("--model", required=default_model is None, default=default_model,
                        help="Stable Diffusion folder or cached Hub repo id (unet/, vae/, text_encoder/, tokenizer/, "
                             "scheduler/); a PMF export (pmf convert to-diffusers) also supplies the ControlNet, the "
                             "reference UNet, the mode and the reference settings it was trained with" + where)
    models.add_argument("--controlnet", help="OpenPose ControlNet folder or cached repo id (default: the --model "
                                             "folder's controlnet/)")
    models.add_argument("--reference-unet", help="reference UNet folder (the trained ACM; mode acm; default: the "
                                                 "--model folder's reference_unet/)")
    models.add_argument("--mode", choices=MODES,
                        help="acm: the reference UNet writes the bank; reference_only: the denoising UNet writes "
                             "it; controlnet_only: no reference; ip_adapter: no reference bank, the source image "
                             "as an IP-Adapter image prompt (needs --ip-adapter and --image-encoder) (default: the "
                             "export's mode, else acm)")
    ip = parser.add_argument_group("image prompt (IP-Adapter)", "the source image as an image prompt: --mode "
                                                                "ip_adapter, or with acm / reference_only")
    ip.add_argument("--ip-adapter", metavar="FILE",
                    help="IP-Adapter weight file (safetensors; a .bin only with --allow-pickle), e.g. h94/IP-Adapter's "
                         "models/ip-adapter_sd15.safetensors (default: the --model export's ip_adapter/)")
    ip.add_argument("--image-encoder", metavar="FOLDER",
                    help="its CLIP image encoder (CLIPVisionModelWithProjection folder, e.g. h94/IP-Adapter's "
                         "models/image_encoder; default: the --model folder's image_encoder/)")
    ip.add_argument("--ip-adapter-scale", type=ip_adapter_scale_arg, metavar="S|JSON",
                    help="weight of the image prompt: a number, or diffusers' per-block JSON dict, e.g. "
                         "'{\"up\": {\"block_0\": [0.0, 1.0, 0.0]}}' (what it leaves out is 0) (default: 1.0)")


def ip_adapter_scale_arg(text: str):
    """``--ip-adapter-scale``: a number, or a JSON object of per-block scales (diffusers' set_ip_adapter_scale)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor a JSON object of per-block scales")
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor a JSON object of per-block scales")
    return float(value) if not isinstance(value, dict) else value


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """The reference-bank flags (:data:`REFERENCE_FLAGS`); None when not given: the model's settings."""
    ref = parser.add_argument_group("reference bank", "defaults: the settings a PMF export was trained with "
                                                      "(pmf_config.json), else the values shown")
    ref.add_argument("--fusion-blocks", choices=FUSION_BLOCKS, help="(full)")
    ref.add_argument("--attention-weight", type=float, help="reference-only auto machine weight (1.0)")
    ref.add_argument("--style-fidelity", type=float,
                     help="how much the unconditional row ignores the reference, in [0, 1] (0)")
    ref.add_argument("--reference-timestep", choices=REFERENCE_TIMESTEPS, help="(same)")
    ref.add_argument("--controlnet-reads-reference", action=argparse.BooleanOptionalAction,
                     help="the ControlNet reads the bank too (off)")
    ref.add_argument("--noise-reference", action=argparse.BooleanOptionalAction,
                     help="write the bank from the source latent noised to the current timestep, as diffusers' "
                          "reference pipelines do (off: the clean latent)")
    ref.add_argument("--reference-method", dest=_FLAG_DESTS["method"], choices=REFERENCE_METHODS,
                     help="attn: reference attention; adain: reference AdaIN (the hidden states take the source's "
                          "per-channel mean and variance); attn+adain: both, diffusers' reference-only (attn)")
    ref.add_argument("--adain-weight", type=float,
                     help="reference-only gn auto machine weight in [0, 2]: which blocks apply AdaIN, 2 = all (1.0)")


def check_model_arguments(args) -> None:
    """The model flags' combinations, before anything loads."""
    if args.mode not in (None, "acm") and args.reference_unet:
        raise PMFInputError(f"--reference-unet is only used by --mode acm (got --mode {args.mode})")
    if args.mode == "controlnet_only" and (args.ip_adapter or args.image_encoder or args.ip_adapter_scale is not None):
        raise PMFInputError("--mode controlnet_only takes no IP-Adapter: use --mode ip_adapter (ControlNet + "
                            "IP-Adapter)")
    if args.image_encoder and not args.ip_adapter and args.mode != "ip_adapter":
        raise PMFInputError("--image-encoder is the IP-Adapter's: give --ip-adapter FILE too")


def build_pipeline(args):
    """The :class:`~pmf_jax.pipelines.RetargetPipeline` of the model flags and the runtime flags."""
    from pmf_jax.commands import options
    from pmf_jax.pipelines import RetargetPipeline

    pipe = RetargetPipeline.from_pretrained(args.model, controlnet=args.controlnet, reference_unet=args.reference_unet,
                                            mode=args.mode, ip_adapter=args.ip_adapter,
                                            image_encoder=args.image_encoder, **options.runtime_kwargs(args))
    if args.ip_adapter_scale is not None:
        if pipe.ip_adapter is None:
            raise PMFInputError("--ip-adapter-scale needs an IP-Adapter (--ip-adapter FILE, or a --model export "
                                "with ip_adapter/)")
        pipe.ip_adapter_scale = args.ip_adapter_scale  # every call's default (checked now, as a call would)
        from pmf_jax.models.image_prompt import expand_scale

        expand_scale(pipe.unet, args.ip_adapter_scale)
    return pipe


def reference_config(pipe, args):
    """The pipeline's reference settings with the reference flags given on the command line."""
    given = {name: getattr(args, _FLAG_DESTS.get(name, name)) for name in REFERENCE_FLAGS}
    return dataclasses.replace(pipe.reference_config, **{k: v for k, v in given.items() if v is not None})


__all__ = ["REFERENCE_FLAGS", "add_model_arguments", "add_reference_arguments", "build_pipeline",
           "check_model_arguments", "ip_adapter_scale_arg", "reference_config"]
