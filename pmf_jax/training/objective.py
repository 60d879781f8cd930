"""The PMF training loss: denoise the target latent given the source (through the reference bank) and the pose.

    x0 = E(target), r = E(source), t ~ U{0..T-1}, x_t = add_noise(x0, ε, t)
    bank = writer.write(r [noised to t if configured], t or 0)         writer: the reference UNet, or the UNet itself
    residuals = controlnet(x_t, t, pose [, bank])                      (stage 2)
    pred = unet(x_t, t, ctx, residuals, reference=read(bank, drop))    drop: per-sample reference dropout
    loss = mean_b w_b · mean(m · (pred − target_b)²)                     target ε, v or x0; w: min-SNR-γ (optional)
                                                                       m: train.person_loss_weight on the pose's
                                                                       pixels (grown by one latent pixel), else 1

With an IP-Adapter (``components.image_prompt``: model.ip_adapter; reference.mode=ip_adapter writes no bank, acm
and reference_only write it too) the UNet also reads the source as an image prompt:

    f = clip(preprocess(source)) [zero where drop]                     frozen image encoder; drop: the rows whose
    tokens = image_proj(f)                                             reference is dropped (one draw for both)
    pred = unet[+ to_k_ip/to_v_ip](x_t, t, ctx, residuals [, reference], ip_tokens=tokens, ip_scale=1)
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from pmf_jax.reference import ReferenceConfig, ReferenceRead, write_inputs
from pmf_jax.training.image_prompt import merge_ip_kernels


def min_snr_weights(snr, gamma: float, prediction_type: str):
    """Min-SNR-γ loss weights (Hang et al. 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v,
    min(SNR, γ) for x0 (sample)."""
    clipped = jnp.minimum(snr, gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0), "sample": clipped}[prediction_type]


def pmf_loss(params: Dict[str, Any], frozen: Dict[str, Any], batch: Dict[str, jax.Array], rng, *, components,
             train_cfg, reference_cfg: ReferenceConfig):
    """Returns (loss, metrics). params: {part: tree} for every UNet-like part; batch: see input_pipeline."""
    c = components
    sched = c.noise_scheduler
    k_t, k_noise, k_offset, k_drop, k_ref_noise = jax.random.split(rng, 5)
    # Two encoder calls, not one on [target; source]: a batch-axis concat of data-parallel shards would make XLA
    # move images between devices.
    x0, ref_latents = (jax.lax.stop_gradient(c.encode(frozen["autoencoder"], batch[k])).astype(jnp.float32)
                       for k in ("target", "source"))
    b = x0.shape[0]
    context = jnp.broadcast_to(frozen["context"], (b, *frozen["context"].shape[1:]))

    t = jax.random.randint(k_t, (b,), 0, sched.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    if train_cfg.noise_offset:
        noise = noise + train_cfg.noise_offset * jax.random.normal(k_offset, (b, 1, 1, x0.shape[-1]), jnp.float32)
    x_t = sched.add_noise(x0, noise, t)
    target = {"epsilon": noise, "v_prediction": sched.velocity(x0, noise, t), "sample": x0}[train_cfg.prediction_type]

    # Reference dropout for appearance guidance: dropped rows attend plainly (ref_mix = 1) and, with an IP-Adapter,
    # read the image prompt of no image.
    read, metrics, unet_params, image_prompt = None, {}, params["unet"], {}
    if c.image_prompt is not None:
        drop = jax.random.uniform(k_drop, (b,)) < train_cfg.reference_drop_prob
        unet_params, image_prompt = _image_prompt(params, frozen, batch, c, drop)
        metrics["image_prompt_dropped"] = jnp.mean(drop.astype(jnp.float32))
    if c.writer is not None:
        ref_in, ref_t = write_inputs(reference_cfg, ref_latents, t,
                                     jax.random.normal(k_ref_noise, ref_latents.shape), sched.add_noise)
        bank = c.reference_unet.apply({"params": params[c.writer]}, ref_in, ref_t, context, reference_cfg,
                                      method=c.reference_unet.write_reference)
        ref_mix = (jax.random.uniform(k_drop, (b,)) < train_cfg.reference_drop_prob).astype(jnp.float32)
        read = ReferenceRead.build(bank, reference_cfg, b, ref_mix=ref_mix)
        metrics["reference_dropped"] = jnp.mean(ref_mix)
    residuals = {}
    if c.controlnet is not None:  # the ControlNet reads no image prompt (as in diffusers' ControlNet pipelines)
        cn_read = read if reference_cfg.controlnet_reads_reference else None
        down, mid = c.controlnet.apply({"params": params["controlnet"]}, x_t, t, context, batch["pose"],
                                       reference=cn_read)
        residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    pred = c.unet.apply({"params": unet_params}, x_t, t, context, reference=read, **image_prompt, **residuals)
    mask = person_mask(batch["pose"], pred.shape[1:3]) if train_cfg.person_loss_weight != 1.0 else None
    loss = weighted_loss(pred, target, t, sched, train_cfg, mask)
    return loss, {"loss": loss, **metrics}


def person_mask(pose, latent_hw):
    """``[b, h, w, 1]`` float 0/1: latent pixels that hold any drawn pose pixel, grown by one (3x3) so that limbs
    thicker than the skeleton's lines are inside. pose: ``[b, H, W, 3]`` in [0, 1], H and W multiples of h and w."""
    b, H, W, _ = pose.shape
    h, w = latent_hw
    drawn = jnp.max(pose, axis=-1) > 0
    cells = jnp.max(drawn.reshape(b, h, H // h, w, W // w), axis=(2, 4)).astype(jnp.float32)[..., None]
    return jax.lax.reduce_window(cells, 0.0, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")


def weighted_loss(pred, target, t, sched, train_cfg, mask=None):
    """The scalar loss: per sample the mean of ``(pred - target)²`` ([b, h, w, c]) weighted by
    ``1 + (train.person_loss_weight - 1) * mask`` (``mask`` [b, h, w, 1], :func:`person_mask`; None: 1), times the
    Min-SNR weight of ``t`` when configured; then the mean over samples."""
    squared = (pred.astype(jnp.float32) - target) ** 2
    if mask is not None:
        squared = squared * (1.0 + (train_cfg.person_loss_weight - 1.0) * mask)
    per_sample = jnp.mean(squared, axis=(1, 2, 3))
    if train_cfg.min_snr_gamma:
        per_sample = per_sample * min_snr_weights(sched.snr(t), train_cfg.min_snr_gamma, train_cfg.prediction_type)
    return jnp.mean(per_sample)


def _image_prompt(params, frozen, batch, c, drop):
    """(UNet params with the ``ip_adapter`` part's ``to_k_ip``/``to_v_ip`` merged in, the UNet's image-prompt
    keywords): the source's tokens through the part's image projection. The merge is a tree merge inside the trace,
    so gradients reach the kernels. Rows where ``drop`` is set get diffusers' unconditional image features (what
    classifier-free guidance on the image prompt compares with)."""
    prompt = c.image_prompt
    features = prompt.features(frozen["image_encoder"], batch["source"], drop)
    tokens = prompt.tokens(params["ip_adapter"]["image_proj"], features)
    return merge_ip_kernels(params["unet"], params["ip_adapter"]["attn2"]), dict(ip_tokens=tokens, ip_scale=1.0)
