"""Train state (params, optimizer state, EMA copies, step, rng) and the optimizer.

The state is a pytree (``jax.tree_util.register_dataclass``) so it can be jitted, donated,
sharded and checkpointed whole. The rng is a raw uint32 key (``jax.random.PRNGKey``) so Orbax
stores it as a plain array; per-step keys are ``jax.random.fold_in(rng, step)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "make_optimizer", "learning_rate_schedule", "ema_decay", "init_state"]


@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema: dict  # name -> params copy, e.g. {"0.9999": ...} or {"edm_hl": ...}
    rng: jax.Array


jax.tree_util.register_dataclass(
    TrainState, data_fields=["step", "params", "opt_state", "ema", "rng"], meta_fields=[]
)


def learning_rate_schedule(optim) -> optax.Schedule:
    """Linear warmup from 0, then constant or cosine decay to ``lr * final_lr_fraction``."""
    lr, warmup = float(optim.lr), int(optim.get("warmup_steps", 0))
    kind = optim.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        decay_steps = max(1, int(optim.decay_steps) - warmup)
        after = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(optim.get("final_lr_fraction", 0.0)))
    else:
        raise ValueError(f"unknown optim.schedule {kind!r}; valid: constant, cosine")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


# (field, default, valid?, rule as printed)
_OPTIM_RULES = (
    ("lr", 0.0, lambda v: math.isfinite(v) and v >= 0, ">= 0 and finite"),
    ("eps", 1e-8, lambda v: math.isfinite(v) and v > 0, "> 0 and finite"),
    ("b1", 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("b2", 0.999, lambda v: 0 <= v < 1, "in [0, 1)"),
    ("weight_decay", 0.0, lambda v: math.isfinite(v) and v >= 0, ">= 0 and finite"),
)


def _check_optim(optim) -> None:
    """AdamW's update is finite for finite gradients only if eps > 0 and b1, b2 < 1 (the bias
    correction divides by 1 - b**t); the train step's non-finite guard relies on that."""
    for name, default, valid, rule in _OPTIM_RULES:
        value = float(optim.get(name, default))
        if not valid(value):
            raise ValueError(f"config.optim.{name}={value} is invalid: must be {rule}")
    clip = optim.get("grad_clip")
    if clip and not (math.isfinite(float(clip)) and float(clip) > 0):
        raise ValueError(f"config.optim.grad_clip={clip} is invalid: must be > 0 (or 0 / None for no clipping)")


def make_optimizer(optim) -> optax.GradientTransformation:
    """AdamW with warmup + constant/cosine schedule and global-norm gradient clipping.

    Raises ValueError for hyperparameters under which AdamW's update can be non-finite for
    finite gradients (``eps <= 0``, ``b1`` or ``b2`` outside [0, 1), a negative or infinite lr
    or weight decay)."""
    _check_optim(optim)
    chain = []
    if optim.get("grad_clip"):
        chain.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    chain.append(
        optax.adamw(
            learning_rate_schedule(optim),
            b1=float(optim.get("b1", 0.9)),
            b2=float(optim.get("b2", 0.999)),
            eps=float(optim.get("eps", 1e-8)),
            weight_decay=float(optim.get("weight_decay", 0.0)),
        )
    )
    return optax.chain(*chain)


def ema_decay(spec, step, batch_size: int):
    """Decay of one EMA copy at ``step``.

    ``spec`` is a float decay (e.g. 0.9999), or a dict ``{"half_life_images": H,
    "rampup_ratio": r}`` for EDM's half-life in images (Karras et al. 2022, App. F.3):
    beta = 0.5 ** (batch / max(min(H, step * batch * r), 1e-8)).
    """
    if isinstance(spec, (int, float)):
        return jnp.asarray(spec, jnp.float32)
    half_life = jnp.asarray(float(spec["half_life_images"]), jnp.float32)
    ratio = spec.get("rampup_ratio")
    if ratio:
        half_life = jnp.minimum(half_life, step.astype(jnp.float32) * batch_size * float(ratio))
    return 0.5 ** (batch_size / jnp.maximum(half_life, 1e-8))


def init_state(model, tx, rng, sample_x, sample_t, sample_y=None) -> TrainState:
    """Initialise params (from ``rng``), optimizer state and EMA copies (equal to params)."""
    init_rng, state_rng = jax.random.split(rng)
    params = model.init({"params": init_rng}, sample_x, sample_t, sample_y)["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema={},  # filled by the caller with the EMA names from the config
        rng=state_rng,
    )
