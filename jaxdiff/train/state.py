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

__all__ = ["TrainState", "make_optimizer", "learning_rate_schedule", "resolve_decay_steps", "ema_decay", "init_state"]


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


def _optim_and_num_steps(config, num_steps=None):
    """``(optim section, number of training steps or None)`` of a full config (``optim`` and
    ``train.num_steps``) or of an ``optim`` section alone."""
    if "optim" in config:
        train = config.get("train")
        if num_steps is None and train is not None and train.get("num_steps") is not None:
            num_steps = int(train["num_steps"])
        return config["optim"], num_steps
    return config, num_steps


def resolve_decay_steps(config, num_steps=None):
    """The step at which a decaying schedule reaches its floor ``lr * final_lr_fraction``.

    ``optim.decay_steps`` if it is > 0, else (0, the default) ``train.num_steps``, so the decay
    follows ``--config.train.num_steps``. ``config`` is a full config, or an ``optim`` section
    with ``num_steps`` given separately. Returns None for ``schedule="constant"``, and for a
    decay over ``train.num_steps`` when no step count is known (an ``optim`` section alone).

    Raises ValueError if ``decay_steps`` is negative or an explicit ``decay_steps`` does not end
    after the warmup (``decay_steps <= warmup_steps``): the schedule would drop to its floor right
    after warmup. With ``decay_steps=0`` and ``train.num_steps <= warmup_steps`` the run ends
    inside the warmup and never reaches the decay; that is allowed (``warmup_steps + 1`` is
    returned). Since ``decay_steps=0`` follows ``train.num_steps``, resuming a run with a larger
    ``train.num_steps`` re-times the cosine over the new length.
    """
    optim, num_steps = _optim_and_num_steps(config, num_steps)
    kind = optim.get("schedule", "constant")
    if kind == "constant":
        return None
    if kind != "cosine":
        raise ValueError(f"unknown optim.schedule {kind!r}; valid: constant, cosine")
    explicit = int(optim.get("decay_steps", 0) or 0)
    if explicit < 0:
        raise ValueError(f"config.optim.decay_steps={explicit} is invalid: must be > 0, or 0 to decay over "
                         "config.train.num_steps")
    warmup = int(optim.get("warmup_steps", 0))
    if explicit:
        total, what = explicit, f"config.optim.decay_steps={explicit}"
    elif num_steps is not None:
        if int(num_steps) <= warmup:
            # a run that ends within its warmup (a quick --config.train.num_steps=100 try of a
            # config with 200 warmup steps) never reaches the decay: nothing to reject
            return warmup + 1
        total, what = int(num_steps), f"config.train.num_steps={int(num_steps)} (config.optim.decay_steps=0 follows it)"
    else:
        return None
    if total <= warmup:
        raise ValueError(
            f"the {kind} learning-rate decay ends at step {total} ({what}), not after the warmup "
            f"(config.optim.warmup_steps={warmup}); it must end after the warmup: raise config.optim.decay_steps / "
            "config.train.num_steps or lower config.optim.warmup_steps")
    return total


def _needs_num_steps(step):
    raise ValueError(
        "config.optim.decay_steps=0 decays the learning rate over config.train.num_steps, which this optimizer "
        "was built without: pass the full config, make_optimizer(config) / learning_rate_schedule(config), "
        "or num_steps=..., or set config.optim.decay_steps")


def learning_rate_schedule(config, num_steps=None) -> optax.Schedule:
    """Linear warmup from 0 over ``optim.warmup_steps``, then constant, or a cosine decay to
    ``lr * final_lr_fraction`` reached at step :func:`resolve_decay_steps` (``optim.decay_steps``,
    or ``train.num_steps`` when it is 0) and held after it.

    ``config``: the full config (preferred: ``decay_steps=0`` then follows ``train.num_steps``),
    or its ``optim`` section (then pass ``num_steps``). The schedule is a function of the
    optimizer's own update count, which a skipped non-finite step does not advance
    (:mod:`jaxdiff.train.step`). A cosine schedule with ``decay_steps=0`` and no known step count
    raises ValueError when it is first called (building an optimizer state with it is fine:
    its structure does not depend on the schedule).
    """
    optim, num_steps = _optim_and_num_steps(config, num_steps)
    lr, warmup = float(optim.lr), int(optim.get("warmup_steps", 0))
    kind = optim.get("schedule", "constant")
    total = resolve_decay_steps(optim, num_steps)
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif total is None:
        after = _needs_num_steps
    else:
        after = optax.cosine_decay_schedule(lr, total - warmup, alpha=float(optim.get("final_lr_fraction", 0.0)))
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


WEIGHT_DECAY_MASKS = ("all", "matrices")


def weight_decay_mask(name: str):
    """optax's ``mask`` for ``config.optim.weight_decay_mask``: ``"all"`` decays every parameter
    (as ``torch.optim.AdamW`` over one parameter group); ``"matrices"`` only those with
    ``ndim >= 2`` (conv / dense kernels, embedding tables), not biases and norm scales -- the
    usual split (e.g. Loshchilov & Hutter's AdamW is applied to weights; GPT-2-style trainers
    exclude biases and norms)."""
    if name == "all":
        return None
    if name == "matrices":
        return lambda params: jax.tree.map(lambda p: len(p.shape) >= 2, params)
    raise ValueError(f"config.optim.weight_decay_mask={name!r} is invalid: must be one of {WEIGHT_DECAY_MASKS}")


def _check_optim(optim) -> None:
    """AdamW's update is finite for finite gradients only if eps > 0 and b1, b2 < 1 (the bias
    correction divides by 1 - b**t); the train step's non-finite guard relies on that."""
    for name, default, valid, rule in _OPTIM_RULES:
        value = float(optim.get(name, default))
        if not valid(value):
            raise ValueError(f"config.optim.{name}={value} is invalid: must be {rule}")
    weight_decay_mask(str(optim.get("weight_decay_mask", "all")))
    clip = optim.get("grad_clip")
    if clip and not (math.isfinite(float(clip)) and float(clip) > 0):
        raise ValueError(f"config.optim.grad_clip={clip} is invalid: must be > 0 (or 0 / None for no clipping)")


def make_optimizer(config, num_steps=None) -> optax.GradientTransformation:
    """AdamW with warmup + constant/cosine schedule and global-norm gradient clipping; weight
    decay on the parameters ``optim.weight_decay_mask`` selects (:func:`weight_decay_mask`).

    ``config``: the full config (what the trainer should pass: a cosine schedule with
    ``optim.decay_steps=0`` then decays over ``train.num_steps``), or its ``optim`` section
    (enough to build an abstract state; to train with ``decay_steps=0`` pass ``num_steps``).
    See :func:`learning_rate_schedule`.

    Raises ValueError for hyperparameters under which AdamW's update can be non-finite for
    finite gradients (``eps <= 0``, ``b1`` or ``b2`` outside [0, 1), a negative or infinite lr
    or weight decay), and for a decay that does not end after the warmup
    (:func:`resolve_decay_steps`)."""
    optim, num_steps = _optim_and_num_steps(config, num_steps)
    _check_optim(optim)
    chain = []
    if optim.get("grad_clip"):
        chain.append(optax.clip_by_global_norm(float(optim.grad_clip)))
    chain.append(
        optax.adamw(
            learning_rate_schedule(optim, num_steps),
            b1=float(optim.get("b1", 0.9)),
            b2=float(optim.get("b2", 0.999)),
            eps=float(optim.get("eps", 1e-8)),
            weight_decay=float(optim.get("weight_decay", 0.0)),
            mask=weight_decay_mask(str(optim.get("weight_decay_mask", "all"))),
        )
    )
    return optax.chain(*chain)


def ema_decay(spec, step, batch_size: int):
    """Decay of one EMA copy in the update of the step that starts with ``step`` steps done.

    ``spec`` is a float decay (e.g. 0.9999), or a dict ``{"half_life_images": H,
    "rampup_ratio": r}`` for EDM's half-life in images (Karras et al. 2022, App. F.3):
    beta = 0.5 ** (batch / max(min(H, step * batch * r), 1e-8)).

    ``step`` is the train state's step counter *before* the update (``state.step``: 0 on the
    first step), so ``step * batch`` is EDM's ``cur_nimg`` as its ``training_loop.py`` uses it,
    before that step's ``cur_nimg += batch_size``: with ramp-up the first update has beta = 0
    (the EMA copy becomes the updated params), the second 0.5 ** (1 / r), and so on.
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
