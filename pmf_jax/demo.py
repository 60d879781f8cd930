"""`make demo` until the trainer lands: a small real job over the model core.

Builds tiny random diffusers models (UNet, reference UNet, ControlNet), saves them as diffusers folders, loads them
with :func:`pmf_jax.io.from_pretrained`, runs the PMF forward (reference bank written by the reference UNet, read by
the ControlNet and the UNet) in JAX and in PyTorch (the reference-attention processor), and writes the parity
numbers to ``outputs/demo/parity.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def main(out_dir: str = "outputs/demo") -> dict:
    import jax
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    from pmf_jax.io import from_pretrained
    from pmf_jax.reference import ReferenceConfig
    from pmf_jax.torch_compat.reference_attention import ReferenceState, install_reference_attention

    jax.config.update("jax_default_matmul_precision", "highest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_cfg = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=4,
                    cross_attention_dim=32, norm_num_groups=8)
    cn_cfg = {k: v for k, v in unet_cfg.items() if k != "up_block_types"}
    torch.manual_seed(0)
    models = {"unet": UNet2DConditionModel(**unet_cfg), "reference_unet": UNet2DConditionModel(**unet_cfg),
              "controlnet": ControlNetModel(**cn_cfg, conditioning_embedding_out_channels=(16, 32))}
    state = ReferenceState()
    loaded = {}
    for name, model in models.items():
        with torch.no_grad():  # random zero convs so the ControlNet path is exercised
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.1)
        model.eval().save_pretrained(out / "models" / name)
        install_reference_attention(model, state)
        loaded[name] = from_pretrained(out / "models" / name)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ref = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 4, 32)).astype(np.float32)
    pose = rng.uniform(size=(2, 32, 32, 3)).astype(np.float32)
    t = np.array([500, 500], np.int32)
    cfg = ReferenceConfig(controlnet_reads_reference=True)

    start = time.perf_counter()
    (unet, pu), (ref_unet, pr), (cn, pc) = loaded["unet"], loaded["reference_unet"], loaded["controlnet"]
    bank = ref_unet.apply({"params": pr}, ref, t[:1], ctx[:1], method=ref_unet.write_reference)
    down, mid = cn.apply({"params": pc}, x, t, ctx, pose, reference=bank, reference_config=cfg)
    ours = np.asarray(unet.apply({"params": pu}, x, t, ctx, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid, reference=bank, reference_config=cfg))
    jax_s = time.perf_counter() - start

    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    with torch.no_grad():
        tt, tc = torch.from_numpy(t).long(), torch.from_numpy(ctx)
        state.write()
        models["reference_unet"](nchw(ref), tt[:1], tc[:1])
        state.read(cfg)
        d, m = models["controlnet"](nchw(x), tt, tc, nchw(pose), return_dict=False)
        theirs = models["unet"](nchw(x), tt, tc, down_block_additional_residuals=d,
                                mid_block_additional_residual=m).sample.numpy().transpose(0, 2, 3, 1)
    rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    report = {"relative_error_jax_vs_torch": rel, "jax_seconds_including_compile": round(jax_s, 2),
              "bank_blocks": len(jax.tree_util.tree_leaves(bank)), "output_shape": list(ours.shape)}
    (out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"PMF forward (reference UNet -> ControlNet -> UNet), JAX vs PyTorch: relative error {rel:.2e}")
    print(f"wrote {out / 'parity.json'}")
    if rel > 1e-4:
        raise SystemExit(f"parity check failed: {rel:.2e} > 1e-4")
    return report


if __name__ == "__main__":
    main()
