"""UNet forward: pmf_jax ``UNet2DConditionModel`` vs diffusers ``UNet2DConditionModel`` on the same device.

    python bench/unet.py                      # SD1.5 UNet, batch 8 @512² (latent 64²), bf16, attention auto
    python bench/unet.py --backend xla        # ... with our einsum attention instead of cuDNN flash
    python bench/unet.py --tiny               # CPU, tiny UNet, float32 (CI smoke mode)

Peers: diffusers eager (SDPA attention, ``torch.inference_mode``, cudnn.benchmark on) and, on GPU or with
``--compile``, ``torch.compile(mode="reduce-overhead")`` (CUDA graphs; ``cudagraph_mark_step_begin`` per call,
output cloned).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import counts  # noqa: E402
import models  # noqa: E402
import reporting  # noqa: E402

TINY_LATENT, FULL_LATENT = 16, 64
TIMESTEP = 500


def ours(env, case, b, size):
    import jax
    import jax.numpy as jnp

    cfg, dtype = env.cfg["unet"], env.jnp_dtype()
    unet, params = models.jax_model("unet", cfg, dtype=dtype, backend=env.args.backend)
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (b, size, size, 4), dtype)                          # [B, h, w, 4]
    t = jnp.full((b,), TIMESTEP, jnp.int32)
    ctx = jax.random.normal(keys[1], (b, 77, cfg["cross_attention_dim"]), dtype)       # [B, T, D]

    def forward(module):
        return jax.jit(lambda p_, x_, t_, c_: module.apply({"params": p_}, x_, t_, c_))

    common.log("pmf_jax: model built; compiling")
    compiled = forward(unet).lower(params, x, t, ctx).compile()
    xla_lowering = None if counts.uses_xla_attention(env) else (
        lambda: forward(unet.clone(attention_backend="xla")).lower(params, x, t, ctx))
    return [common.Runner(case, common.OURS, lambda: compiled(params, x, t, ctx), common.jax_sync,
                          warmup=env.args.warmup, flops=counts.program_flops(compiled, xla_lowering),
                          peak_bytes=counts.compiled_peak_bytes(compiled), peak_source="memory_analysis",
                          note=f"attention {env.args.backend}, {models.param_count(params) / 1e6:.2f}M params")]


class Peer:
    """The diffusers UNet and its inputs, built once for the eager and the compiled runner."""

    def __init__(self, env, b, size):
        import torch

        cfg, device, dtype = env.cfg["unet"], env.torch_device, env.torch_dtype()
        torch.backends.cudnn.benchmark = True
        self.model = models.torch_model("unet", cfg, device=device, dtype=dtype)
        gen = torch.Generator(device).manual_seed(1)
        self.inputs = (torch.randn((b, 4, size, size), generator=gen, device=device, dtype=dtype),  # [B, 4, h, w]
                       torch.full((b,), TIMESTEP, device=device, dtype=torch.long),
                       torch.randn((b, 77, cfg["cross_attention_dim"]), generator=gen, device=device, dtype=dtype))
        common.log("torch: model built")

    def eager(self):
        import torch

        with torch.inference_mode():
            return self.model(*self.inputs).sample

    def compiled_call(self):
        import torch

        cmodel = torch.compile(self.model, mode="reduce-overhead")

        def call():
            with torch.inference_mode():
                torch.compiler.cudagraph_mark_step_begin()
                return cmodel(*self.inputs).sample.clone()

        return call


def main(argv=None) -> dict:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    args = p.parse_args(argv)
    env = common.setup(args)
    b, size = args.batch, TINY_LATENT if env.tiny else FULL_LATENT
    case = f"unet fwd b{b} latent {size}x{size}"
    report = reporting.Report("unet", env, [case], {"case": case, "unet": env.cfg["unet"], "context_tokens": 77})
    common.log(f"{case} on {env.platform}, {env.dtype}")

    peer = {}

    def get_peer():
        if "peer" not in peer:
            peer["peer"] = Peer(env, b, size)
        return peer["peer"]

    peers = [(case, "torch eager", lambda: [common.torch_runner(env, case, "torch eager", get_peer().eager,
                                                                note="SDPA")])]
    if env.compile:
        peers.append((case, "torch.compile", lambda: [common.torch_runner(
            env, case, "torch.compile", get_peer().compiled_call(), compiled=True)]))
    else:
        reporting.skip_compile_rows(report, env, [case])
    common.run_all(report, env, [(case, common.OURS, lambda: ours(env, case, b, size))], peers,
                   release_peers=peer.clear)
    return report.finish()


if __name__ == "__main__":
    main()
