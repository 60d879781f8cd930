"""Pose retargeting in PyTorch from a ``pmf convert to-diffusers`` folder, with diffusers' own models and schedulers.

    from pmf_jax.torch_compat.pipeline import PMFTorchPipeline
    pipe = PMFTorchPipeline.from_pretrained("export/", scheduler="ddim")
    images = pipe(source_image, pose_image, num_inference_steps=25)      # PIL images

The same computation as :class:`pmf_jax.pipelines.RetargetPipeline` (modes, guidance rows, reference bank written
by the reference UNet from the source latent and read through
:mod:`pmf_jax.torch_compat.reference_attention`: reference attention, reference AdaIN in the UNet), so both give the same images from the same initial noise. What it
does not do: pose detection, keypoint rendering and aspect-preserving fitting (give a source image and an OpenPose
skeleton image; both are resized to ``height`` x ``width``, default the source's size), and it draws noise with
torch generators (pass ``latents`` to reproduce a JAX run).

Guidance, with N images and G rows per image (sample-major, row n·G + g):
  * ``appearance_guidance_scale=None`` — G = 2, ``[u, c]``: ``ε = u + g·(c − u)``; row u is unconditional for the
    bank (``style_fidelity`` blends it towards plain attention).
  * ``appearance_guidance_scale=g_a`` — G = 3, ``[u, c, a]`` (u and a without reference):
    ``ε = u + g·(a − u) + g_a·(c − a)``.

IP-Adapter (mode ``ip_adapter``, or with acm / reference_only): :meth:`PMFTorchPipeline.load_ip_adapter` loads it with
diffusers' own ``load_ip_adapter`` (its modules and attention processors in the UNet; the reference processors are
put back on ``attn1``). The source image is the image prompt of row c; rows u and a get diffusers' negative image
embeddings (zeros, or for Plus the encoding of an all-zero image); the ControlNet and the reference writer read no
image prompt (the writer runs at IP scale 0).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from pmf_jax.constants import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, MODES, SCHEDULER_NAMES, SD15_SCHEDULER_CONFIG
from pmf_jax.errors import PMFInputError
from pmf_jax.pipelines.defaults import sampling_defaults
from pmf_jax.pipelines.images import load_image
from pmf_jax.reference import ReferenceConfig
from pmf_jax.schedulers import SCHEDULERS
from pmf_jax.torch_compat.reference_attention import (ReferenceState, install_reference_adain,
                                                      install_reference_attention)


class PatchAutoencoder(torch.nn.Module):
    """The pixel-space "autoencoder" of :class:`pmf_jax.models.identity_vae.IdentityAutoencoder`, NCHW: p×p pixel
    patches folded into channels, [B, 3, H, W] ⇄ [B, 3·p², H/p, W/p], in the same channel order (p = 1: identity)."""

    def __init__(self, patch_size: int = 1, channels: int = 3):
        super().__init__()
        self.patch_size, self.channels = int(patch_size), int(channels)
        self.scaling_factor, self.shift_factor = 1.0, 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise PMFInputError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        z = x.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5)
        return z.reshape(b, h // p, w // p, c * p * p).permute(0, 3, 1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, _, h, w = z.shape
        p, c = self.patch_size, self.channels
        x = z.permute(0, 2, 3, 1).reshape(b, h, w, p, p, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, h * p, w * p, c).permute(0, 3, 1, 2)


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by our name (one of ``constants.SCHEDULER_NAMES``) from a scheduler config."""
    import diffusers

    if name not in SCHEDULER_NAMES:
        raise PMFInputError(f"unknown scheduler {name!r} (choose one of {', '.join(SCHEDULER_NAMES)})")
    return getattr(diffusers, SCHEDULERS[name].DIFFUSERS_CLASS).from_config(config)


class PMFTorchPipeline:
    """Pose retargeting with diffusers models: ``unet`` (UNet2DConditionModel), ``controlnet`` (ControlNetModel),
    ``scheduler`` (a diffusers scheduler), ``vae`` (AutoencoderKL, or :class:`PatchAutoencoder` / None for pixel
    space), ``text_encoder`` + ``tokenizer`` (CLIP; None: prompt-free, a zeros context [1, 1, D]),
    ``reference_unet`` (mode "acm"), ``mode`` and the default ``reference_config``."""

    def __init__(self, unet, controlnet, scheduler, vae=None, text_encoder=None, tokenizer=None, reference_unet=None,
                 mode: str = "acm", reference_config: Optional[ReferenceConfig] = None):
        if mode not in MODES:
            raise PMFInputError(f"mode={mode!r} must be one of {', '.join(MODES)}")
        if (mode == "acm") != (reference_unet is not None):
            raise PMFInputError("mode 'acm' needs a reference UNet, and only mode 'acm' takes one")
        if text_encoder is not None and tokenizer is None:
            raise PMFInputError("a text encoder needs its tokenizer")
        self.unet, self.controlnet, self.scheduler = unet.eval(), controlnet.eval(), scheduler
        self.vae = (vae if vae is not None else PatchAutoencoder()).eval()
        self.text_encoder = text_encoder.eval() if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.reference_unet = reference_unet.eval() if reference_unet is not None else None
        self.mode = mode
        self.reference_config = reference_config or ReferenceConfig()
        #: IP-Adapter (:meth:`load_ip_adapter`): the diffusers pipeline around :attr:`unet` that loaded it (its
        #: ``set_ip_adapter_scale``), the CLIP image encoder and its image processor; None without one.
        self.ip_pipe = self.image_encoder = self.feature_extractor = None
        self.ip_adapter_scale = 1.0
        # what a call uses when it gives no steps / guidance scale; from_pretrained takes an export's
        self.sampling = {"steps": DEFAULT_STEPS, "guidance_scale": DEFAULT_GUIDANCE_SCALE}
        self.state = ReferenceState()
        for model in (unet, controlnet, reference_unet):
            if model is not None:
                install_reference_attention(model, self.state)
                if model is not controlnet:  # the ControlNet reads attention entries only
                    install_reference_adain(model, self.state)

    @classmethod
    def from_pretrained(cls, folder, *, controlnet=None, reference_unet=None, mode: Optional[str] = None,
                        scheduler: Optional[str] = None, torch_dtype=torch.float32, device="cpu", ip_adapter=None,
                        image_encoder=None):
        """Opens an exported folder (``pmf convert to-diffusers``): unet/, controlnet/, reference_unet/, vae/ (or
        none: the patch autoencoder of the UNet's 3·p² channels), text_encoder/ + tokenizer/ (or none: prompt-free),
        scheduler/ and pmf_config.json (mode and reference settings). ``controlnet``/``reference_unet`` replace the
        folder's; ``mode`` replaces pmf_config's. The scheduler, and a call's default steps and guidance scale, are
        the export's sampling settings (pmf_config.json "sampling", as ``pmf retarget`` uses them) unless given.
        ``ip_adapter`` (a weight file) and ``image_encoder`` (its folder; default beside the file, else the folder's
        ``image_encoder/``): :meth:`load_ip_adapter`; an export's ``ip_adapter/ip_adapter.safetensors`` is loaded
        when present (not in mode controlnet_only)."""
        from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

        from pmf_jax.convert.folders import read_pmf_config, reference_config_of
        from pmf_jax.models.identity_vae import patch_size_for_channels

        folder = Path(folder)
        if not (folder / "unet" / "config.json").is_file():
            raise PMFInputError(f"{folder} is not an exported PMF folder (no unet/config.json)")
        pmf = read_pmf_config(folder) or {}
        mode = mode or pmf.get("mode", "acm")
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        cn_folder = Path(controlnet) if controlnet is not None else folder / "controlnet"
        if not (cn_folder / "config.json").is_file():
            raise PMFInputError(f"no ControlNet at {cn_folder}: pass controlnet= a diffusers ControlNetModel folder")
        cn = ControlNetModel.from_pretrained(cn_folder)
        ref = None
        if mode == "acm":
            ref = UNet2DConditionModel.from_pretrained(reference_unet or folder / "reference_unet")
        if (folder / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(folder / "vae")
        else:
            patch = patch_size_for_channels(unet.config.out_channels)
            if patch is None:
                raise PMFInputError(f"{folder} has no vae/ and its UNet's {unet.config.out_channels} channels are "
                                    f"not 3·p² (a pixel-space model)")
            vae = PatchAutoencoder(patch)
        text_encoder = tokenizer = None
        if (folder / "text_encoder").is_dir():
            from transformers import CLIPTextModel, CLIPTokenizer

            text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
            tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        path = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text()) if path.is_file() else dict(SD15_SCHEDULER_CONFIG)
        sampling = sampling_defaults(folder)
        pipe = cls(unet, cn, make_scheduler(scheduler or sampling["scheduler"], config), vae, text_encoder, tokenizer,
                   ref, mode, reference_config_of(pmf))
        pipe.sampling = {"steps": sampling["steps"], "guidance_scale": sampling["guidance_scale"]}
        exported = folder / "ip_adapter" / "ip_adapter.safetensors"
        if ip_adapter is None and exported.is_file() and mode != "controlnet_only":
            ip_adapter = exported
        if ip_adapter is not None:
            pipe.load_ip_adapter(ip_adapter, image_encoder, feature_extractor=folder / "feature_extractor")
        elif mode == "ip_adapter":
            raise PMFInputError("mode 'ip_adapter' needs an IP-Adapter (ip_adapter= a weight file)")
        return pipe.to(device, torch_dtype)

    def load_ip_adapter(self, weight_file, image_encoder=None, feature_extractor=None) -> None:
        """Loads an IP-Adapter file into :attr:`unet` with diffusers' own ``load_ip_adapter`` (on a
        StableDiffusionPipeline around the UNet), and its CLIP image encoder (``image_encoder``: a folder; default
        the ``image_encoder/`` beside the file). The image processor: ``feature_extractor`` (a folder with
        preprocessor_config.json) when it exists, else diffusers' default for the encoder's image size."""
        import diffusers
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        if self.mode == "controlnet_only":
            raise PMFInputError("mode 'controlnet_only' takes no IP-Adapter: use mode 'ip_adapter'")
        weight_file = Path(weight_file)
        if not weight_file.is_file():
            raise PMFInputError(f"IP-Adapter weight file {weight_file} does not exist")
        encoder_folder = Path(image_encoder) if image_encoder is not None else weight_file.parent / "image_encoder"
        if not (encoder_folder / "config.json").is_file():
            raise PMFInputError(f"no CLIP image encoder at {encoder_folder}: pass image_encoder= its folder")
        processor = None
        if feature_extractor is not None and (Path(feature_extractor) / "preprocessor_config.json").is_file():
            processor = CLIPImageProcessor.from_pretrained(feature_extractor)
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_folder).to(self.device).eval()
        self.ip_pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=self.unet, scheduler=self.scheduler,
            safety_checker=None, feature_extractor=processor, image_encoder=encoder, requires_safety_checker=False)
        # diffusers rebuilds every attn1 processor from its class without arguments: plain ones while it loads
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.unet.set_attn_processor({name: AttnProcessor2_0() if name.endswith(".attn1.processor") else proc
                                      for name, proc in self.unet.attn_processors.items()})
        self.ip_pipe.load_ip_adapter(str(weight_file.parent), subfolder="", weight_name=weight_file.name,
                                     image_encoder_folder=None, low_cpu_mem_usage=False, local_files_only=True)
        self.image_encoder, self.feature_extractor = encoder, self.ip_pipe.feature_extractor
        install_reference_attention(self.unet, self.state)  # the reference processors back on attn1

    def image_embeds(self, source: torch.Tensor, layout: Sequence[str], n: int) -> torch.Tensor:
        """diffusers' IP-Adapter image embeddings of every guidance row, [N·G, 1, ...] sample-major: the source's for
        row c, the negative ones (zeros; Plus: an all-zero image's hidden_states[-2]) for the others. ``source``:
        [1, 3, H, W] in [0, 1]."""
        from diffusers.models.embeddings import ImageProjection

        plus = not isinstance(self.unet.encoder_hid_proj.image_projection_layers[0], ImageProjection)
        image = Image.fromarray(np.round(source[0].permute(1, 2, 0).float().cpu().numpy() * 255).astype(np.uint8))
        pixels = self.feature_extractor(image, return_tensors="pt").pixel_values.to(self.device,
                                                                                     self.image_encoder.dtype)
        if plus:
            given = self.image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
            empty = self.image_encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            given = self.image_encoder(pixels).image_embeds
            empty = torch.zeros_like(given)
        rows = [given if row == "c" else empty for row in layout]
        return torch.stack(rows, dim=1).flatten(0, 1).repeat(n, *([1] * (given.ndim - 1)))[:, None].to(self.dtype)  # loaded in fp32 first: the dtype keyword differs across versions

    def to(self, device=None, dtype=None):
        for model in (self.unet, self.controlnet, self.vae, self.text_encoder, self.reference_unet,
                      self.image_encoder):
            if model is not None:
                cast = dtype is not None and getattr(model, "dtype", dtype) != dtype
                model.to(device=device, **({"dtype": dtype} if cast else {}))  # diffusers warns on any dtype= arg
        return self

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    # ------------------------------------------------------------------------------------------------ pieces
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> [B, T, D] text context (CLIP last hidden state; zeros [B, 1, D] for prompt-free models)."""
        prompts = list(prompts)
        if self.text_encoder is None:
            if any(prompts):
                raise PMFInputError("this pipeline has no text encoder, so it takes no prompt")
            dim = self.unet.config.cross_attention_dim
            dim = dim if isinstance(dim, int) else dim[0]
            return torch.zeros((len(prompts), 1, dim), dtype=self.dtype, device=self.device)
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> latents [B, C, h, w] (the posterior mean, shifted and scaled)."""
        if isinstance(self.vae, PatchAutoencoder):
            return self.vae.encode(images)
        mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((mean - shift) * self.vae.config.scaling_factor).to(self.dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1]."""
        if isinstance(self.vae, PatchAutoencoder):
            images = self.vae.decode(latents)
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            z = latents / self.vae.config.scaling_factor + shift
            images = self.vae.decode(z.to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0.0, 1.0)

    def _image(self, image, name: str, size) -> torch.Tensor:
        """PIL (any mode) / uint8 [H, W, 3] / float [H, W, 3] in [0, 1] -> [1, 3, h, w] float in [0, 1] at ``size``
        (h, w); read as :func:`pmf_jax.pipelines.images.load_image` reads it."""
        image = Image.fromarray(load_image(image, name))
        if size is not None and image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.BICUBIC)
        array = np.asarray(image, np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)[None].to(self.device, self.dtype)

    def _latent_factor(self) -> int:
        if isinstance(self.vae, PatchAutoencoder):
            return self.vae.patch_size
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _add_noise(self, x0, noise, t):
        """The training forward process x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε (for every scheduler, as in JAX)."""
        acp = self.scheduler.alphas_cumprod.to(x0.device)[int(round(float(t)))].to(x0.dtype)
        return acp.sqrt() * x0 + (1 - acp).sqrt() * noise

    # ------------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, source_image, pose_image, prompt: str = "", negative_prompt: str = "",
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 appearance_guidance_scale: Optional[float] = None, controlnet_conditioning_scale: float = 1.0,
                 num_images: int = 1, height: Optional[int] = None, width: Optional[int] = None,
                 reference_config: Optional[ReferenceConfig] = None, generator: Optional[torch.Generator] = None,
                 latents: Union[torch.Tensor, np.ndarray, None] = None, output_type: str = "pil",
                 ip_adapter_scale=None):
        """Generates ``num_images`` images of the source person in the pose of ``pose_image`` (an OpenPose skeleton).

        Args:
          latents: the initial noise x_T [num_images, C, h, w] (NCHW; unscaled), default drawn from ``generator``.
          num_inference_steps, guidance_scale: default: ``self.sampling`` (the export's settings).
          reference_config: default: the export's settings (pmf_config.json).
          output_type: "pil" (list), "np" (float [N, H, W, 3] in [0, 1]) or "latent" (tensor [N, C, h, w]).
          ip_adapter_scale: with an IP-Adapter, a number or diffusers' per-block dict (default
            :attr:`ip_adapter_scale`, 1.0).
        """
        num_inference_steps = self.sampling["steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = self.sampling["guidance_scale"] if guidance_scale is None else guidance_scale
        if output_type not in ("pil", "np", "latent"):
            raise PMFInputError(f"output_type={output_type!r} must be pil, np or latent")
        if appearance_guidance_scale is not None and self.mode == "controlnet_only":
            raise PMFInputError("appearance guidance needs a reference (mode 'acm' or 'reference_only')")
        size = None if height is None else (int(height), int(width))
        source = self._image(source_image, "source image", size)
        size = tuple(source.shape[2:])
        factor = self._latent_factor()
        if size[0] % factor or size[1] % factor:
            raise PMFInputError(f"height/width {size} must be multiples of the autoencoder's factor {factor}")
        pose = self._image(pose_image, "pose image", size)
        n, g = num_images, 2 if appearance_guidance_scale is None else 3
        reference = (None if self.mode in ("controlnet_only", "ip_adapter")
                     else (reference_config or self.reference_config))
        if ip_adapter_scale is not None and self.ip_pipe is None:
            raise PMFInputError("ip_adapter_scale is given, but no IP-Adapter is loaded (load_ip_adapter)")
        if self.mode == "ip_adapter" and self.ip_pipe is None:
            raise PMFInputError("mode 'ip_adapter' needs an IP-Adapter (load_ip_adapter)")
        ip_kwargs = {}
        if self.ip_pipe is not None:
            scale = self.ip_adapter_scale if ip_adapter_scale is None else ip_adapter_scale
            self.ip_pipe.set_ip_adapter_scale(scale)
            embeds = self.image_embeds(source, ("u", "c") if g == 2 else ("u", "c", "a"), n)
            ip_kwargs = {"added_cond_kwargs": {"image_embeds": [embeds]}}

        neg, pos = self.encode_prompts([negative_prompt] * n), self.encode_prompts([prompt] * n)   # [N, T, D]
        context = torch.stack([neg, pos] + ([pos] if g == 3 else []), dim=1).flatten(0, 1)         # [N·G, T, D]
        pose_rows = pose.repeat(n * g, 1, 1, 1)
        shape = (n, self.unet.config.in_channels, size[0] // factor, size[1] // factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
        latents = torch.as_tensor(np.asarray(latents) if isinstance(latents, np.ndarray) else latents)
        if tuple(latents.shape) != shape:
            raise PMFInputError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        ref_latents = self.encode_images(source * 2.0 - 1.0).repeat(n, 1, 1, 1) if reference else None

        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        x = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}
        fixed_bank = None
        write_ip = None  # the writer is the UNet with IP-Adapter processors: it runs at IP scale 0
        if reference is not None and self.ip_pipe is not None and self.mode != "acm":
            write_ip = ({"added_cond_kwargs": {"image_embeds": [ip_kwargs["added_cond_kwargs"]["image_embeds"][0][
                ::g]]}}, scale)
        if reference is not None and reference.reference_timestep == "zero":
            fixed_bank = self._write_bank(reference, ref_latents, pos, torch.zeros((), dtype=torch.long), g,
                                          generator, write_ip)   # (attention bank, AdaIN statistics)
        for t in self.scheduler.timesteps:
            x_in = self.scheduler.scale_model_input(x, t)
            rows = x_in.repeat_interleave(g, dim=0)
            if reference is not None:
                self.state.bank, self.state.adain = fixed_bank if fixed_bank is not None else self._write_bank(
                    reference, ref_latents, pos, t, g, generator, write_ip)
                flags = torch.tensor([1.0, 0.0] if g == 2 else [1.0, 0.0, 1.0]).repeat(n)
                self.state.read(reference, **({"uncond_mask": flags} if g == 2 else {"ref_mix": flags}))
            self.state.mode = "read" if reference is not None and reference.controlnet_reads_reference else "off"
            down, mid = self.controlnet(rows, t, context, controlnet_cond=pose_rows,
                                        conditioning_scale=controlnet_conditioning_scale, return_dict=False)
            self.state.mode = "read" if reference is not None else "off"
            eps = self.unet(rows, t, context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid, **ip_kwargs).sample.float()
            self.state.off()
            eps = eps.reshape((n, g) + eps.shape[1:])
            if g == 2:
                guided = eps[:, 0] + guidance_scale * (eps[:, 1] - eps[:, 0])
            else:
                u, c, a = eps[:, 0], eps[:, 1], eps[:, 2]
                guided = u + guidance_scale * (a - u) + appearance_guidance_scale * (c - a)
            x = self.scheduler.step(guided.to(x.dtype), t, x, **step_kwargs).prev_sample
        self.state.bank, self.state.adain = {}, {}
        if output_type == "latent":
            return x
        images = self.decode_latents(x).permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return images
        return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]

    def _write_bank(self, reference: ReferenceConfig, ref_latents, ref_context, t, rows: int, generator,
                    write_ip=None):
        """``(bank, AdaIN statistics)`` written at timestep t (0 for reference_timestep "zero"), each entry repeated
        to the G rows. ``write_ip``: (the UNet's IP-Adapter keyword arguments for N rows, the call's scale) when the
        writer is the UNet with IP-Adapter processors: it writes at scale 0 (no image prompt), then the scale is
        restored."""
        t_ref = torch.zeros_like(torch.as_tensor(t)) if reference.reference_timestep == "zero" else t
        latents = ref_latents
        if reference.noise_reference:
            noise = torch.randn(ref_latents.shape, generator=generator, dtype=torch.float32).to(ref_latents)
            latents = self._add_noise(ref_latents, noise, t_ref)
        writer = self.reference_unet if self.mode == "acm" else self.unet
        self.state.write()
        if write_ip is not None:
            self.ip_pipe.set_ip_adapter_scale(0.0)
            writer(latents, t_ref, ref_context, **write_ip[0])
            self.ip_pipe.set_ip_adapter_scale(write_ip[1])
        else:
            writer(latents, t_ref, ref_context)
        bank = {name: h.repeat_interleave(rows, dim=0) for name, h in self.state.bank.items()}
        adain = {key: tuple(s.repeat_interleave(rows, dim=0) for s in stats) for key, stats in self.state.adain.items()}
        self.state.off()
        return bank, adain


__all__ = ["PMFTorchPipeline", "PatchAutoencoder", "make_scheduler"]
