"""Pose retargeting end to end: pmf_jax ``RetargetPipeline`` (ACM mode) vs the same loop in torch with diffusers.

    python bench/retarget.py                  # SD1.5 parts, 1 image @512², 20 UniPC steps, text CFG, bf16
    python bench/retarget.py --tiny           # CPU, tiny parts @64², float32 (CI smoke mode)

Cases:
  * ``e2e``: prompt + negative prompt -> CLIP text encoding, VAE encode of the source, 20 UniPC steps (each: the
    reference UNet writes the bank from the clean source latent at t, the pose ControlNet and the UNet run on the
    CFG pair [negative, prompt], both reading rows of the bank, guidance 7.5), VAE decode, image on the host.
    Ours: one ``RetargetPipeline.__call__`` (built from loaded parts). Peer: diffusers modules + the reference
    attention processor of ``pmf_jax.torch_compat`` + diffusers ``UniPCMultistepScheduler`` in a Python loop; eager,
    and with ``torch.compile(mode="reduce-overhead")`` on the UNet, reference UNet and ControlNet.
  * ``denoiser``: one denoising step's network work (bank write + ControlNet + UNet on the CFG pair + guidance),
    ours the pipeline's own model function (``RetargetPipeline.model_fn``) jitted alone: where the per-step time
    goes, compared with the same three calls in torch.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import counts  # noqa: E402
import models  # noqa: E402
import reporting  # noqa: E402

STEPS, GUIDANCE, PROMPT, NEGATIVE = 20, 7.5, "a person in a red coat", "blurry"


def _inputs(size: int, n: int):
    """Host inputs: source photos and pose skeletons, uint8 [n, H, W, 3]."""
    import numpy as np

    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    pose = np.zeros((n, size, size, 3), np.uint8)
    pose[:, size // 4: 3 * size // 4, size // 2 - 2: size // 2 + 2] = (255, 0, 85)  # a stick figure's spine
    return source, pose


class JaxSide:
    """Our pipeline (built from loaded parts with random weights) and its model function (one step's guided
    prediction, :meth:`RetargetPipeline.model_fn`) jitted alone."""

    def __init__(self, env, n, steps, tokenizer, source, pose):
        import jax.numpy as jnp

        cfg, dtype, backend = env.cfg, env.jnp_dtype(), env.args.backend
        self.env, self.n, self.steps, self.tokenizer = env, n, steps, tokenizer
        self.parts = {name: models.jax_model(kind, cfg[kind], dtype=dtype, backend=backend, seed=i)
                      for i, (name, kind) in enumerate((("unet", "unet"), ("reference", "unet"),
                                                         ("controlnet", "controlnet"), ("vae", "vae"),
                                                         ("clip", "clip")))}
        self.pipe = self.pipeline()
        self.size = cfg["image"]
        self.source, self.pose = source, pose
        self.static = self.pipe.make_static((self.size, self.size), num_inference_steps=steps, scheduler="unipc",
                                            output_type="np")
        self.jnp = jnp

    def pipeline(self, backend=None):
        """The ACM pipeline over our parts (their modules with attention ``backend`` when given)."""
        from pmf_jax.constants import SD15_SCHEDULER_CONFIG
        from pmf_jax.pipelines import RetargetPipeline

        p = {k: ((m.clone(attention_backend=backend) if backend else m), v) for k, (m, v) in self.parts.items()}
        return RetargetPipeline(unet=p["unet"], controlnet=p["controlnet"], vae=p["vae"], text_encoder=p["clip"],
                                tokenizer=self.tokenizer, reference_unet=p["reference"], mode="acm",
                                scheduler_config=SD15_SCHEDULER_CONFIG)

    def e2e(self):
        return self.pipe(list(self.source), list(self.pose), prompt=PROMPT, negative_prompt=NEGATIVE,
                         num_inference_steps=self.steps, guidance_scale=GUIDANCE, scheduler="unipc", height=self.size,
                         width=self.size, seed=0, pose_kind="skeleton", output_type="np")

    # ---- one denoiser call: the pipeline's model function (bank write, ControlNet, UNet on the CFG pair, guidance)
    def denoiser_args(self):
        import jax

        from pmf_jax.pipelines import RetargetBatch

        jnp, n = self.jnp, self.n
        h = self.size // self.parts["vae"][0].downscale_factor
        k = jax.random.split(jax.random.key(5), 4)
        t_len, d = self.pipe.prompts.context_shape
        context = jax.random.normal(k[1], (n, 2, t_len, d), jnp.float32)                # rows [u, c] per sample
        batch = RetargetBatch(seeds=jnp.zeros((n,), jnp.uint32), rows=jnp.arange(n, dtype=jnp.int32),
                              source=None, pose=jax.random.uniform(k[2], (n, self.size, self.size, 3), jnp.float32),
                              context=context, ref_context=context[:, 1])
        scalars = {"guidance": jnp.float32(GUIDANCE), "appearance": jnp.float32(0.0), "control": jnp.float32(1.0)}
        return dict(x=jax.random.normal(k[0], (n, h, h, 4), jnp.float32), t=jnp.asarray(801, jnp.int32),
                    batch=batch, scalars=scalars, ref_latents=jax.random.normal(k[3], (n, h, h, 4), jnp.float32))

    def denoiser_fn(self, backend=None):
        import jax

        pipe, static = (self.pipeline(backend) if backend else self.pipe), self.static

        def fn(params, a):
            return pipe.model_fn(static, params, a["batch"], a["scalars"], {"ref_latents": a["ref_latents"]},
                                 a["x"], a["t"])

        return jax.jit(fn)

    def params(self):
        return {k: self.pipe.params[k] for k in ("unet", "controlnet", "reference")}

    def e2e_flops(self, step_flops):
        """Text encoding of the 2N prompts + VAE encode + one denoiser call per step + VAE decode (XLA cost analysis of
        the lowered pieces; the scheduler's elementwise update is not counted)."""
        import jax

        jnp, n = self.jnp, self.n
        clip, clip_p = self.parts["clip"]
        vae, vae_p = self.parts["vae"]
        vae_x = vae.clone(attention_backend="xla")
        clip_x = clip.clone(attention_backend="xla")
        dtype = self.env.jnp_dtype()
        h = self.size // vae.downscale_factor
        ids = jax.ShapeDtypeStruct((2 * n, 77), jnp.int32)                        # shapes only: nothing runs
        img = jax.ShapeDtypeStruct((n, self.size, self.size, 3), dtype)
        lat = jax.ShapeDtypeStruct((n, h, h, 4), dtype)
        text = counts.lowered_flops(jax.jit(lambda p, i: clip_x.apply({"params": p}, i)).lower(clip_p, ids))
        enc = counts.lowered_flops(jax.jit(lambda p, x: vae_x.apply({"params": p}, x, method=vae_x.encode)).lower(
            vae_p, img))
        dec = counts.lowered_flops(jax.jit(lambda p, z: vae_x.apply({"params": p}, z, method=vae_x.decode)).lower(
            vae_p, lat))
        return text + enc + dec + self.steps * step_flops


class TorchSide:
    """The same retargeting in torch: diffusers modules, our reference processor, diffusers UniPC, Python loop."""

    def __init__(self, env, n, steps, tokenizer, source, pose):
        import diffusers
        import torch

        from pmf_jax.constants import SD15_SCHEDULER_CONFIG
        from pmf_jax.reference import ReferenceConfig
        from pmf_jax.torch_compat.reference_attention import ReferenceState, install_reference_attention

        cfg, self.device, self.dtype = env.cfg, env.torch_device, env.torch_dtype()
        self.n, self.steps, self.size, self.tokenizer = n, steps, cfg["image"], tokenizer
        torch.manual_seed(0)
        mk = lambda kind: models.torch_model(kind, cfg[kind], device=self.device, dtype=self.dtype)  # noqa: E731
        self.unet, self.ref_unet, self.controlnet = mk("unet"), mk("unet"), mk("controlnet")
        self.vae, self.text_encoder = mk("vae"), mk("clip")
        self.state = ReferenceState()
        for model in (self.ref_unet, self.controlnet, self.unet):
            install_reference_attention(model, self.state)
        self.config = ReferenceConfig()
        self.scheduler = diffusers.UniPCMultistepScheduler(**SD15_SCHEDULER_CONFIG)
        self.source_u8, self.pose_u8 = source, pose
        self.eager_nets = (self.ref_unet, self.controlnet, self.unet)
        self.uncond_mask = torch.tensor([1.0, 0.0] * n)
        common.log("torch: models built")

    def compiled_nets(self):
        import torch

        return tuple(torch.compile(m, mode="reduce-overhead") for m in self.eager_nets)

    def denoise(self, nets, x, t, ctx, ref_ctx, pose, ref_latents):
        """One step's networks (``nets``: ref UNet, ControlNet, UNet — eager or compiled):
        x [N, 4, h, w] -> guided ε [N, 4, h, w] (rows [u, c] per sample)."""
        import torch

        ref_unet, controlnet, unet = nets
        compiled = nets is not self.eager_nets
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()
        self.state.write()
        ref_unet(ref_latents, t, ref_ctx)
        self.state.off()
        xg = x.repeat_interleave(2, dim=0)
        down, mid = controlnet(xg, t, ctx, pose, return_dict=False)
        self.state.read(self.config, uncond_mask=self.uncond_mask)
        eps = unet(xg, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        self.state.off()
        if compiled:
            eps = eps.clone()  # CUDA-graph output memory is reused by the next replay
        u, c = eps.float()[0::2], eps.float()[1::2]
        return u + GUIDANCE * (c - u)

    def e2e(self, nets):
        import torch

        dev, dt, n = self.device, self.dtype, self.n
        with torch.inference_mode():
            prompts = [p for _ in range(n) for p in (NEGATIVE, PROMPT)]                      # rows [u, c] per sample
            ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids.to(dev)
            ctx = self.text_encoder(ids)[0]                                                 # [2N, 77, D]
            source = torch.from_numpy(self.source_u8).to(dev).permute(0, 3, 1, 2).to(dt) / 127.5 - 1.0
            pose = (torch.from_numpy(self.pose_u8).to(dev).permute(0, 3, 1, 2).to(dt) / 255.0).repeat_interleave(
                2, dim=0)
            sf = self.vae.config.scaling_factor
            ref_latents = self.vae.encode(source).latent_dist.mean * sf
            self.scheduler.set_timesteps(self.steps, device=dev)
            h = self.size // 2 ** (len(self.vae.config.block_out_channels) - 1)
            gen = torch.Generator(dev).manual_seed(0)
            x = torch.randn((n, 4, h, h), generator=gen, device=dev, dtype=torch.float32)
            x = x * self.scheduler.init_noise_sigma
            for t in self.scheduler.timesteps:
                eps = self.denoise(nets, self.scheduler.scale_model_input(x, t).to(dt), t, ctx, ctx[1::2], pose,
                                   ref_latents)
                x = self.scheduler.step(eps, t, x).prev_sample
            image = self.vae.decode((x / sf).to(dt)).sample
            return (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    def denoiser_inputs(self):
        import torch

        dev, dt, n = self.device, self.dtype, self.n
        h = self.size // 2 ** (len(self.vae.config.block_out_channels) - 1)
        d = self.text_encoder.config.hidden_size
        gen = torch.Generator(dev).manual_seed(5)
        ctx = torch.randn((2 * n, 77, d), generator=gen, device=dev, dtype=dt)
        return (torch.randn((n, 4, h, h), generator=gen, device=dev, dtype=dt), torch.tensor(801, device=dev),
                ctx, ctx[1::2], torch.rand((2 * n, 3, self.size, self.size), generator=gen, device=dev, dtype=dt),
                torch.randn((n, 4, h, h), generator=gen, device=dev, dtype=dt))


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1, help="images per call (default 1)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"sampling steps (default {STEPS})")
    args = p.parse_args(argv)
    env = common.setup(args)
    n, size, steps = args.images, env.cfg["image"], args.steps
    e2e_case = f"e2e retarget {n}x{size}x{size}, {steps} UniPC steps, ACM, CFG"
    step_case = f"denoiser call (bank write + ControlNet + UNet, CFG pair) x{n}"
    cases = (e2e_case, step_case)
    report = reporting.Report("retarget", env, cases, {
        "e2e": e2e_case, "denoiser": step_case, "steps": steps, "guidance_scale": GUIDANCE, "mode": "acm",
        "reference": "ReferenceConfig() defaults", "models": {k: env.cfg[k] for k in ("unet", "controlnet", "vae",
                                                                                      "clip")}})
    common.log(f"{e2e_case} on {env.platform}, {env.dtype}")
    tokenizer = models.make_tokenizer()
    source, pose = _inputs(size, n)

    def ours():
        side = JaxSide(env, n, steps, tokenizer, source, pose)
        params, dargs = side.params(), side.denoiser_args()
        common.log("pmf_jax: pipeline built; compiling the denoiser call (the pipeline compiles in its warm-up)")
        denoiser = side.denoiser_fn().lower(params, dargs).compile()
        step_flops = counts.program_flops(denoiser, None if counts.uses_xla_attention(env) else (
            lambda: side.denoiser_fn("xla").lower(params, dargs)))
        return [common.Runner(e2e_case, common.OURS, side.e2e, lambda out: out, warmup=args.warmup,
                              flops=side.e2e_flops(step_flops), peak_after=counts.jax_device_peak_bytes,
                              peak_source="device peak_bytes_in_use",
                              note=f"RetargetPipeline, attention {args.backend}"),
                common.Runner(step_case, common.OURS, lambda: denoiser(params, dargs), common.jax_sync,
                              warmup=args.warmup, flops=step_flops, peak_bytes=counts.compiled_peak_bytes(denoiser),
                              peak_source="memory_analysis")]

    peer = {}

    def torch_runners(impl, compiled):
        import torch

        if "side" not in peer:
            peer["side"] = TorchSide(env, n, steps, tokenizer, source, pose)
        side = peer["side"]
        nets = side.compiled_nets() if compiled else side.eager_nets
        with torch.inference_mode():  # made here too: tensors from outside inference mode would recompile
            inputs = side.denoiser_inputs()

        def denoise():
            with torch.inference_mode():
                return side.denoise(nets, *inputs)

        what = "; UNet/ref UNet/ControlNet compiled" if compiled else ""
        return [common.torch_runner(env, e2e_case, impl, lambda: side.e2e(nets), compiled=compiled,
                                    note=f"diffusers UniPC, Python loop{what}"),
                common.torch_runner(env, step_case, impl, denoise, compiled=compiled)]

    peers = [(cases, "torch eager", lambda: torch_runners("torch eager", False))]
    if env.compile:
        peers.append((cases, "torch.compile", lambda: torch_runners("torch.compile", True)))
    else:
        reporting.skip_compile_rows(report, env, cases)
    common.run_all(report, env, [(cases, common.OURS, ours)], peers, release_peers=peer.clear)
    return report.finish()


if __name__ == "__main__":
    main()
