"""The learning-rate schedule: ``optim.decay_steps = 0`` decays over ``train.num_steps``, a decay
that ends within the warmup is rejected, and configs that set their decay keep their numbers.

Expected values come from the closed form (linear warmup, then optax's cosine
``lr * ((1 - alpha) * (1 + cos(pi * t / T)) / 2 + alpha)``), not from the code under test.
"""

import math

import jax
import jax.numpy as jnp
import optax
import pytest

from jaxdiff.config_base import base_config, check_config
from jaxdiff.train.state import learning_rate_schedule, make_optimizer, resolve_decay_steps
from tests.helpers import load_config


def closed_form_lr(step, lr, warmup, total, alpha):
    """Warmup 0 -> lr over ``warmup`` steps, then cosine to ``lr * alpha`` at ``total``, held after."""
    if step < warmup:
        return lr * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return lr * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * t)) + alpha)


def optimizer_lr(tx, step):
    """The learning rate ``tx`` applies at update ``step``: a first AdamW update of constant-sign
    gradients is ``-lr * g / (|g| + eps)``, read with the schedule's count set to ``step``."""
    params = {"w": jnp.zeros((3,), jnp.float32)}
    grads = {"w": jnp.full((3,), 0.25, jnp.float32)}  # global norm 0.43 < grad_clip 1: no clipping
    state = tx.init(params)
    is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    state = jax.tree.map(lambda s: optax.ScaleByScheduleState(count=jnp.asarray(step, jnp.int32)) if is_sched(s) else s,
                         state, is_leaf=is_sched)
    updates, _ = tx.update(grads, state, params)
    return -float(updates["w"][0]) * (0.25 + 1e-8) / 0.25


def _digits(num_steps=None):
    cfg = load_config("digits")
    if num_steps is not None:
        cfg.train.num_steps = num_steps
    return cfg


def test_digits_default_run_is_unchanged():
    """configs/digits.py now says decay_steps = 0 (follow num_steps = 2000); its LR at every step
    is what decay_steps = 2000 gave: warmup 200, cosine over 1800 steps to 5% of 1e-3."""
    cfg = _digits()
    assert cfg.optim.decay_steps == 0 and cfg.train.num_steps == 2000
    sched = learning_rate_schedule(cfg)
    tx = make_optimizer(cfg)
    for step in (0, 200, 1000, 1999):
        want = closed_form_lr(step, 1e-3, 200, 2000, 0.05)
        assert float(sched(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step
        assert optimizer_lr(tx, step) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert float(sched(0)) == 0.0
    assert float(sched(200)) == pytest.approx(1e-3, rel=1e-6)
    assert float(sched(1000)) == pytest.approx(1e-3 * (0.95 * 0.5 * (1 + math.cos(math.pi * 800 / 1800)) + 0.05), rel=1e-6)
    # every step, against the explicit decay_steps = 2000 the config used to set
    old = cfg.copy_and_resolve_references()
    old.optim.decay_steps = 2000
    steps = jnp.arange(0, 2100)
    assert bool(jnp.all(jax.vmap(sched)(steps) == jax.vmap(learning_rate_schedule(old.optim))(steps)))


def test_decay_steps_zero_follows_num_steps():
    cfg = base_config()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.final_lr_fraction = 2e-4, 100, "cosine", 0.1
    cfg.train.num_steps = 1000
    assert resolve_decay_steps(cfg) == 1000
    sched = learning_rate_schedule(cfg)
    assert float(sched(100)) == pytest.approx(2e-4, rel=1e-6)  # warmup end: the peak
    last = float(sched(999))
    assert last == pytest.approx(closed_form_lr(999, 2e-4, 100, 1000, 0.1), rel=1e-6)
    assert 2e-5 < last < 2e-5 * 1.001  # the last trained step is at the floor, within 0.1%
    lrs = [float(v) for v in jax.vmap(sched)(jnp.arange(100, 1000))]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing from warmup to the end
    assert float(sched(1000)) == pytest.approx(2e-5, rel=1e-6) == float(sched(5000))


def test_cifar10_ddpm_with_cosine_no_longer_drops_to_zero_after_warmup():
    """The reported case: schedule=cosine on cifar10_ddpm (warmup 5000, num_steps 800k) used to
    give lr 0 from step 5001 on (a one-step decay)."""
    cfg = load_config("cifar10_ddpm")
    cfg.optim.schedule = "cosine"
    sched = learning_rate_schedule(cfg)
    for step in (5000, 5001, 6000, 100_000, 799_999):
        want = closed_form_lr(step, 2e-4, 5000, 800_000, 0.0)
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-12), step
    assert float(sched(100_000)) > 1.9e-4


def test_num_steps_override_moves_the_decay():
    """README: --config.train.num_steps=4000 on configs/digits.py decays over 4000 steps (it used to
    train steps 2000-3999 at the floor, 5e-5)."""
    cfg = _digits(4000)
    sched, tx = learning_rate_schedule(cfg), make_optimizer(cfg)
    for step in (200, 2000, 3000, 3999):
        want = closed_form_lr(step, 1e-3, 200, 4000, 0.05)
        assert float(sched(step)) == pytest.approx(want, rel=1e-6), step
        assert optimizer_lr(tx, step) == pytest.approx(want, rel=1e-5), step
    assert float(sched(2000)) > 5e-4  # mid-decay, not the floor
    assert float(sched(4000)) == pytest.approx(5e-5, rel=1e-5)
    # an explicit decay_steps is kept whatever num_steps says
    cfg.optim.decay_steps = 2000
    assert float(learning_rate_schedule(cfg)(3000)) == pytest.approx(5e-5, rel=1e-5)


@pytest.mark.parametrize("decay_steps, num_steps, culprit", [
    (200, 2000, "config.optim.decay_steps=200"),
    (150, 2000, "config.optim.decay_steps=150"),
    (200, 50, "config.optim.decay_steps=200"),
])
def test_decay_within_warmup_is_rejected(decay_steps, num_steps, culprit):
    cfg = load_config("digits", "tiny")  # sizes that build
    cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.train.num_steps = 200, decay_steps, num_steps
    for build in (resolve_decay_steps, learning_rate_schedule, make_optimizer, check_config):
        with pytest.raises(ValueError, match="config.optim.warmup_steps=200") as info:
            build(cfg)
        assert culprit in str(info.value)
    cfg.optim.schedule = "constant"  # no decay: nothing to reject
    check_config(cfg)
    assert float(learning_rate_schedule(cfg)(1000)) == pytest.approx(float(cfg.optim.lr))


def test_negative_decay_steps_is_rejected():
    cfg = _digits()
    cfg.optim.decay_steps = -1
    with pytest.raises(ValueError, match="config.optim.decay_steps=-1"):
        make_optimizer(cfg)


def test_optim_section_alone():
    """An optim section without train.num_steps builds the optimizer state (callers that only
    need the state's structure do that), but a decay over num_steps cannot run without it."""
    cfg = _digits()
    tx = make_optimizer(cfg.optim)
    params = {"w": jnp.zeros((3,))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="config.train.num_steps.*make_optimizer\\(config\\)"):
        tx.update({"w": jnp.ones((3,))}, state, params)
    # num_steps given separately is the same as the full config
    assert optimizer_lr(make_optimizer(cfg.optim, num_steps=2000), 1000) == pytest.approx(
        optimizer_lr(make_optimizer(cfg), 1000), rel=1e-7)
    # an explicit decay_steps needs no num_steps (configs/digits.py:tiny)
    tiny = load_config("digits", "tiny")
    assert float(learning_rate_schedule(tiny.optim)(11)) == pytest.approx(closed_form_lr(11, 1e-3, 2, 20, 0.05), rel=1e-6)


@pytest.mark.parametrize("num_steps", [0, 50, 200])
def test_run_that_ends_within_warmup_follows_the_warmup(num_steps):
    """decay_steps=0 with train.num_steps <= warmup (a quick try of a config): the run never
    reaches the decay, so it is not an error; the LR is the linear warmup at every step it runs."""
    cfg = load_config("digits", "tiny")
    cfg.optim.warmup_steps, cfg.optim.decay_steps, cfg.train.num_steps = 200, 0, num_steps
    check_config(cfg)
    sched = learning_rate_schedule(cfg)
    lr = float(cfg.optim.lr)
    for step in range(0, num_steps + 1, 25):
        assert float(sched(step)) == pytest.approx(lr * step / 200, rel=1e-6, abs=1e-12)
