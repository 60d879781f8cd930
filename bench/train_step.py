"""PMF training step (stage 2): pmf_jax ``train_step`` vs the same step written with diffusers modules in torch.

    python bench/train_step.py                # SD1.5 parts, batch 8 @512², bf16 compute, attention auto
    python bench/train_step.py --tiny         # CPU, tiny parts, float32 (CI smoke mode)

One step = VAE-encode target and source (frozen), DDPM noise, the reference UNet writes the bank, the pose
ControlNet, the base UNet reads the bank (reference dropout 5%), ε-MSE, gradients of the stage-2 trainable set
(reference UNet + ControlNet, fp32 master weights), global-norm clip 1.0, AdamW. The base UNet and the VAE are
frozen in the compute dtype. No rematerialisation.

Ours: ``pmf_jax.training.state.train_step`` jitted with the state donated, as ``train/loop.py`` does (one device).
Peer: diffusers modules with the reference attention processor of ``pmf_jax.torch_compat``, autocast to the
compute dtype, SDPA, ``torch.optim.AdamW`` (fused on CUDA), ``clip_grad_norm_``; eager, and with the three
networks under ``torch.compile(mode="reduce-overhead")`` on GPU or with ``--compile``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import counts  # noqa: E402
import models  # noqa: E402
import reporting  # noqa: E402

REFERENCE_DROP = 0.05


def _train_config():
    from pmf_jax.config import TrainConfig

    # constant LR without warm-up: the torch peer runs a constant LR too (the schedule costs nothing either way)
    return TrainConfig(stage=2, warmup_steps=0, schedule="constant", reference_drop_prob=REFERENCE_DROP,
                       grad_clip=1.0, ema_decay=None, remat=False)


def ours(env, case, batch_size):
    """Our step, compiled like train/loop.py (trainable fp32, frozen in the compute dtype, state donated)."""
    import jax
    import jax.numpy as jnp

    from pmf_jax.constants import SD15_NOISE_SCHEDULE
    from pmf_jax.reference import ReferenceConfig
    from pmf_jax.schedulers import make_scheduler
    from pmf_jax.training.components import Components
    from pmf_jax.training.state import bind_step, init_state, make_optimizer

    args, cfg, dtype = env.args, env.cfg, env.jnp_dtype()
    backend = args.backend
    unet, frozen_unet = models.jax_model("unet", cfg["unet"], dtype=dtype, backend=backend, seed=0)
    _, ref_params = models.jax_model("unet", cfg["unet"], dtype=dtype, param_dtype=jnp.float32, backend=backend,
                                     seed=1)
    controlnet, cn_params = models.jax_model("controlnet", cfg["controlnet"], dtype=dtype, param_dtype=jnp.float32,
                                             backend=backend, seed=2)
    vae, vae_params = models.jax_model("vae", cfg["vae"], dtype=dtype, backend=backend, seed=3)

    def components(unet_module, cn_module):
        return Components(unet=unet_module, reference_unet=unet_module, controlnet=cn_module, autoencoder=vae,
                          noise_scheduler=make_scheduler("ddpm", SD15_NOISE_SCHEDULE),
                          trainable=("reference_unet", "controlnet"),
                          context_shape=(77, cfg["unet"]["cross_attention_dim"]))

    tc = _train_config()
    tx = make_optimizer(tc)
    state = jax.jit(lambda p: init_state(p, tx, tc, jax.random.key(0)), donate_argnums=0)(
        {"reference_unet": ref_params, "controlnet": cn_params})
    frozen_params = {"unet": frozen_unet}
    size = cfg["image"]
    keys = jax.random.split(jax.random.key(4), 4)
    frozen = {"autoencoder": vae_params,
              "context": jax.random.normal(keys[0], (1, 77, cfg["unet"]["cross_attention_dim"]), dtype)}
    images = lambda k, lo: jax.random.uniform(k, (batch_size, size, size, 3), jnp.float32, lo, 1.0)  # noqa: E731
    batch = {"target": images(keys[1], -1.0), "source": images(keys[2], -1.0), "pose": images(keys[3], 0.0)}

    def jitted(unet_module, cn_module):
        return jax.jit(bind_step(components(unet_module, cn_module), tx, tc, ReferenceConfig()), donate_argnums=(0,))

    common.log("pmf_jax: models and state built; compiling the step")
    compiled = jitted(unet, controlnet).lower(state, frozen_params, frozen, batch).compile()
    common.log("pmf_jax: compiled")
    xla_lowering = None if counts.uses_xla_attention(env) else (
        lambda: jitted(unet.clone(attention_backend="xla"), controlnet.clone(attention_backend="xla")).lower(
            state, frozen_params, frozen, batch))
    flops = counts.program_flops(compiled, xla_lowering)
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], frozen_params, frozen, batch)
        return holder["state"], metrics

    trainable = models.param_count(state.params) / 1e6
    return [common.Runner(case, common.OURS, step, common.jax_sync, warmup=args.warmup, flops=flops,
                          peak_bytes=counts.compiled_peak_bytes(compiled), peak_source="memory_analysis",
                          note=f"attention {backend}, {trainable:.2f}M trainable params")]


class TorchStep:
    """The same step in torch: diffusers modules + the reference attention processor, autocast, AdamW."""

    def __init__(self, env, batch_size):
        import diffusers
        import torch

        from pmf_jax.constants import SD15_NOISE_SCHEDULE
        from pmf_jax.reference import ReferenceConfig
        from pmf_jax.torch_compat.reference_attention import ReferenceState, install_reference_attention

        cfg, device, dtype = env.cfg, env.torch_device, env.torch_dtype()
        self.device, self.dtype, self.b = device, dtype, batch_size
        torch.manual_seed(0)
        self.unet = models.torch_model("unet", cfg["unet"], device=device, dtype=dtype).requires_grad_(False)
        self.ref_unet = models.torch_model("unet", cfg["unet"], device=device, dtype=torch.float32).train()
        self.controlnet = models.torch_model("controlnet", cfg["controlnet"], device=device,
                                             dtype=torch.float32).train()
        self.vae = models.torch_model("vae", cfg["vae"], device=device, dtype=dtype).requires_grad_(False)
        self.state = ReferenceState()
        for model in (self.ref_unet, self.controlnet, self.unet):
            install_reference_attention(model, self.state)
        self.reference_config = ReferenceConfig()
        self.noise_scheduler = diffusers.DDPMScheduler(**SD15_NOISE_SCHEDULE)
        self.params = list(self.ref_unet.parameters()) + list(self.controlnet.parameters())
        tc = _train_config()
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, weight_decay=tc.weight_decay,
                                     fused=device.type == "cuda")
        size, ctx_dim = cfg["image"], cfg["unet"]["cross_attention_dim"]
        gen = torch.Generator(device).manual_seed(4)
        def images(low):  # [B, 3, H, W] uniform in [low, 1]
            return torch.rand((batch_size, 3, size, size), generator=gen, device=device) * (1 - low) + low

        self.target, self.source, self.pose = images(-1.0), images(-1.0), images(0.0)
        self.context = torch.randn((1, 77, ctx_dim), generator=gen, device=device, dtype=dtype).expand(
            batch_size, -1, -1)
        self.scaling = self.vae.config.scaling_factor
        common.log("torch: models built")

    def compiled_nets(self):
        import torch

        return tuple(torch.compile(m, mode="reduce-overhead") for m in (self.ref_unet, self.controlnet, self.unet))

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self, nets=None):
        """One optimisation step with the given (ref UNet, ControlNet, UNet) callables (default: the eager modules)."""
        import torch
        import torch.nn.functional as F

        if nets is not None:
            torch.compiler.cudagraph_mark_step_begin()
        ref_unet, controlnet, unet = nets or (self.ref_unet, self.controlnet, self.unet)
        b, dev = self.b, self.device
        with torch.no_grad(), self.autocast():
            images = torch.cat([self.target, self.source]).to(self.dtype)
            latents = self.vae.encode(images).latent_dist.mean.float() * self.scaling
        x0, ref = latents.chunk(2)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), device=dev)
        noise = torch.randn_like(x0)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        with self.autocast():
            self.state.write()
            ref_unet(ref, t, self.context)
            self.state.off()
            down, mid = controlnet(x_t, t, self.context, self.pose, return_dict=False)
            ref_mix = (torch.rand(b, device=dev) < REFERENCE_DROP).float()
            self.state.read(self.reference_config, ref_mix=ref_mix)
            pred = unet(x_t, t, self.context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
            self.state.off()
        loss = F.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 8; 2 with --tiny)")
    args = p.parse_args(argv)
    env = common.setup(args)
    batch_size = args.batch or (2 if env.tiny else 8)
    size = env.cfg["image"]
    case = f"PMF stage-2 train step b{batch_size} @{size}x{size}"
    report = reporting.Report("train_step", env, [case], {
        "case": case, "trainable": ["reference_unet", "controlnet"], "frozen": ["unet", "vae"],
        "optimizer": "AdamW + clip 1.0", "reference_drop": REFERENCE_DROP,
        "models": {k: env.cfg[k] for k in ("unet", "controlnet", "vae")}})
    common.log(f"{case} on {env.platform}, {env.dtype}")

    peer = {}

    def get_peer():
        if "step" not in peer:
            peer["step"] = TorchStep(env, batch_size)
        return peer["step"]

    fused = " fused" if env.torch_device.type == "cuda" else ""
    peers = [(case, "torch eager", lambda: [common.torch_runner(env, case, "torch eager", get_peer().step,
                                                                note=f"autocast, SDPA, AdamW{fused}")])]
    if env.compile:
        def compiled():
            step, nets = get_peer(), get_peer().compiled_nets()
            return [common.torch_runner(env, case, "torch.compile", lambda: step.step(nets), compiled=True,
                                        note="the 3 networks compiled")]

        peers.append((case, "torch.compile", compiled))
    else:
        reporting.skip_compile_rows(report, env, [case])
    common.run_all(report, env, [(case, common.OURS, lambda: ours(env, case, batch_size))], peers,
                   release_peers=peer.clear)
    return report.finish()


if __name__ == "__main__":
    main()
