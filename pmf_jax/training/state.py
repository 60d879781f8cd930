"""Train state, optimizer and the jitted update step.

The state holds only what trains (fp32 master params of the trainable parts), the optimizer state, the EMA copy,
the step and the run's base RNG key (per-step keys are ``fold_in(key, step)``, so a resumed run draws the same
randomness as an uninterrupted one). Frozen parts (bf16) are a separate, non-donated argument.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from pmf_jax.parallel import opt_state_shardings, param_shardings, replicated
from pmf_jax.training.objective import pmf_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Dict[str, Any]  # {part: tree} of the trainable parts
    opt_state: Any
    ema_params: Optional[Dict[str, Any]]
    rng: jax.Array  # raw key data (uint32), so checkpoints hold plain arrays


def learning_rate_schedule(train_cfg):
    warmup = max(train_cfg.warmup_steps, 0)
    if train_cfg.schedule == "constant":
        decay = optax.constant_schedule(train_cfg.lr)
    else:
        decay = optax.cosine_decay_schedule(train_cfg.lr, max(train_cfg.steps - warmup, 1))
    if not warmup:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, train_cfg.lr, warmup), decay], [warmup])


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW with warmup + cosine/constant schedule, global-norm clipping, and gradient accumulation."""
    parts = []
    if train_cfg.grad_clip:
        parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
    parts.append(optax.adamw(learning_rate_schedule(train_cfg), weight_decay=train_cfg.weight_decay))
    tx = optax.chain(*parts)
    if train_cfg.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=train_cfg.grad_accum_steps)
    return tx


def init_state(trainable_params, tx, train_cfg, rng) -> TrainState:
    ema = jax.tree_util.tree_map(jnp.copy, trainable_params) if train_cfg.ema_decay is not None else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable_params, opt_state=tx.init(trainable_params),
                      ema_params=ema, rng=jax.random.key_data(rng))


def train_step(state: TrainState, frozen_params: Dict[str, Any], frozen: Dict[str, Any], batch, *, components, tx,
               train_cfg, reference_cfg):
    """(state, frozen UNet-like params, frozen extras, batch) -> (state, metrics). Pure; jit with donation of state."""
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(trainable):
        params = {**frozen_params, **trainable}
        return pmf_loss(params, frozen, batch, rng, components=components, train_cfg=train_cfg,
                        reference_cfg=reference_cfg)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        decay = train_cfg.ema_decay
        ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=learning_rate_schedule(train_cfg)(state.step))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def state_shardings(abstract: TrainState, mesh, rules) -> TrainState:
    """``NamedSharding``s of a train state (``abstract``: e.g. ``jax.eval_shape`` of :func:`init_state`): params,
    optimizer moments and EMA by the rules, the step and key replicated."""
    params_sh = param_shardings(abstract.params, mesh, rules)
    return TrainState(step=replicated(mesh), params=params_sh,
                      opt_state=opt_state_shardings(abstract.opt_state, abstract.params, params_sh, mesh),
                      ema_params=None if abstract.ema_params is None else params_sh, rng=replicated(mesh))


def bind_step(components, tx, train_cfg, reference_cfg):
    return functools.partial(train_step, components=components, tx=tx, train_cfg=train_cfg,
                             reference_cfg=reference_cfg)
