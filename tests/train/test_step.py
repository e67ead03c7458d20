"""The train step: EMA arithmetic, label dropout, optimizer schedule, loss goes down."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn, sampling_params
from jaxdiff.train.state import ema_decay, learning_rate_schedule, make_optimizer
from jaxdiff.train.step import ema_specs, label_dropout, make_train_step
from tests.helpers import load_config


@pytest.fixture(scope="module")
def setup():
    cfg = load_config("digits", "tiny")
    model = build_model(cfg)
    tx = make_optimizer(cfg.optim)
    init = jax.jit(make_init_fn(cfg, model, tx))
    step = jax.jit(make_train_step(cfg, model, tx))
    from jaxdiff.data import load_digits

    x, y = load_digits("train")
    batch = {"image": jnp.asarray(x[: cfg.data.batch_size]), "label": jnp.asarray(y[: cfg.data.batch_size])}
    return cfg, init, step, batch


def test_ema_update_matches_formula(setup):
    cfg, init, step, batch = setup
    s1, _ = step(init(jax.random.PRNGKey(0)), batch)  # warmup: the lr is 0 at step 0
    s2, metrics = step(s1, batch)
    d = float(cfg.ema.decays[0])
    for p1, e1, p2, e2 in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s1.ema["ema_0"]),
                              jax.tree.leaves(s2.params), jax.tree.leaves(s2.ema["ema_0"])):
        np.testing.assert_allclose(e2, d * e1 + (1 - d) * p2, rtol=1e-6, atol=1e-7)
    assert int(s2.step) == 2
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    # The zero-initialised output conv is the first layer to move (upstream grads start at 0).
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params))]
    assert any(changed)


def test_step_is_deterministic_and_keys_fold_in_step(setup):
    _, init, step, batch = setup
    s0 = init(jax.random.PRNGKey(0))
    a, ma = step(s0, batch)
    b, mb = step(s0, batch)
    assert float(ma["loss"]) == float(mb["loss"])
    c, mc = step(a, batch)  # same batch, next step -> different noise -> different loss
    assert float(mc["loss"]) != float(ma["loss"])


def test_loss_decreases_over_training(setup):
    cfg, init, step, batch = setup
    s = init(jax.random.PRNGKey(0))
    losses = []
    for _ in range(30):
        s, m = step(s, batch)
        losses.append(float(m["loss"]))
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses


def test_label_dropout_rate():
    y = jnp.zeros((20000,), jnp.int32)
    out = label_dropout(jax.random.PRNGKey(0), y, 10, 0.1)
    frac = float(jnp.mean(out == 10))
    assert abs(frac - 0.1) < 4 * np.sqrt(0.1 * 0.9 / 20000)
    assert set(np.unique(np.asarray(out)).tolist()) == {0, 10}


def test_edm_half_life_ema_decay():
    spec = {"half_life_images": 500_000, "rampup_ratio": None}
    beta = float(ema_decay(spec, jnp.asarray(1000), 512))
    assert beta == pytest.approx(0.5 ** (512 / 500_000), rel=1e-6)
    # ramp-up limits the half-life to step * batch * ratio early on
    beta_early = float(ema_decay({"half_life_images": 500_000, "rampup_ratio": 0.05}, jnp.asarray(10), 512))
    assert beta_early == pytest.approx(0.5 ** (512 / (10 * 512 * 0.05)), rel=1e-6)


def test_lr_schedule_warmup_then_cosine():
    cfg = load_config("digits")
    sched = learning_rate_schedule(cfg)
    assert float(sched(0)) == 0.0
    assert float(sched(cfg.optim.warmup_steps)) == pytest.approx(cfg.optim.lr, rel=1e-6)
    end = float(sched(cfg.train.num_steps))  # decay_steps = 0: the decay ends at train.num_steps
    assert end == pytest.approx(cfg.optim.lr * cfg.optim.final_lr_fraction, rel=1e-4)


def _edm_betas(num_steps, batch_size, ema_halflife_kimg, ema_rampup_ratio):
    """EDM's training_loop.py (Karras et al. 2022), EMA part, written out: the beta of each step,
    computed with cur_nimg before that step's ``cur_nimg += batch_size``."""
    betas, cur_nimg = [], 0
    for _ in range(num_steps):
        ema_halflife_nimg = ema_halflife_kimg * 1000
        if ema_rampup_ratio is not None:
            ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
        betas.append(0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8)))
        cur_nimg += batch_size
    return betas


def test_edm_ema_betas_match_edm_training_loop():
    """ema_decay at state.step = k (k steps done) is EDM's beta of its (k+1)-th step: 0 on the
    first step with ramp-up, then 0.5 ** (1 / r), 0.5 ** (1 / (2 r)), ..."""
    for batch, kimg, ratio in ((512, 500, 0.05), (16, 0.064, 0.5), (512, 500, None)):
        spec = {"half_life_images": kimg * 1000, "rampup_ratio": ratio}
        want = _edm_betas(6, batch, kimg, ratio)
        got = [float(ema_decay(spec, jnp.asarray(k, jnp.int32), batch)) for k in range(6)]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert _edm_betas(2, 512, 500, 0.05) == [0.0, 0.5 ** 20]


def test_train_step_edm_ema_uses_the_count_before_the_step():
    """The train step's EDM EMA follows EDM's betas: after the first step the EMA copy equals the
    params (beta = 0), then ema_k = beta_k * ema_{k-1} + (1 - beta_k) * params_k."""
    cfg = load_config("digits", "tiny")
    cfg.optim.warmup_steps = 0  # the params move on the first step
    cfg.ema.decays = ()
    cfg.ema.half_life_images, cfg.ema.rampup_ratio = 64.0, 0.5  # batch 16: betas 0, 1/4, 1/2, 0.63
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    init = jax.jit(make_init_fn(cfg, model, tx))
    step = jax.jit(make_train_step(cfg, model, tx))
    from jaxdiff.data import load_digits

    x, y = load_digits("train")
    b = int(cfg.data.batch_size)
    batch = {"image": jnp.asarray(x[:b]), "label": jnp.asarray(y[:b])}
    betas = _edm_betas(4, b, 0.064, 0.5)
    assert betas[:2] == [0.0, 0.25]
    s = init(jax.random.PRNGKey(0))
    ema = [np.asarray(e, np.float64) for e in jax.tree.leaves(s.ema["ema_hl"])]
    for beta in betas:
        s, _ = step(s, batch)
        params = [np.asarray(p, np.float64) for p in jax.tree.leaves(s.params)]
        ema = [beta * e + (1 - beta) * p for e, p in zip(ema, params)]
        for want, got in zip(ema, jax.tree.leaves(s.ema["ema_hl"])):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(s.step) == 4


def test_skipped_step_does_not_advance_the_lr_schedule(setup):
    """Documented: the schedule (and AdamW's bias correction) counts applied updates, not steps."""
    _, init, step, batch = setup
    s, _ = step(init(jax.random.PRNGKey(0)), batch)
    bad = dict(batch, image=batch["image"].at[0, 0, 0, 0].set(jnp.nan))
    s2, m = step(s, bad)
    assert int(m["nonfinite"]) == 1 and int(s2.step) == 2
    import optax

    counts = lambda st: [int(c) for _, c in optax.tree_utils.tree_get_all_with_path(st.opt_state, "count")]  # noqa: E731
    assert len(counts(s)) == 2  # AdamW's count and the schedule's
    assert counts(s) == counts(s2) and set(counts(s2)) == {1}  # one applied update after two steps


def test_ema_specs_and_sampling_params(setup):
    cfg, init, _, _ = setup
    assert list(ema_specs(cfg)) == ["ema_0"]
    s = init(jax.random.PRNGKey(0))
    assert sampling_params(s) is s.ema["ema_0"]
    assert sampling_params(s, "params") is s.params
    with pytest.raises(ValueError, match="ema_0"):
        sampling_params(s, "nope")


@pytest.mark.parametrize("config_name", [pytest.param("digits", marks=pytest.mark.slow),  # ~36 s on CI's CPU
                                         "imagenet256_dit"])
def test_label_dropout_trains_the_null_class_of_unet_and_dit(config_name):
    """With class_dropout > 0 the null-class row of the label table (row num_classes) gets a
    gradient -- the unconditional branch CFG needs is trained; with 0 it never moves."""
    import optax

    from jaxdiff.data import load_digits

    x, y = load_digits("train")
    moved = {}
    for p in (0.0, 0.5):
        cfg = load_config(config_name, "tiny")
        cfg.diffusion.class_dropout = p
        model = build_model(cfg)
        tx = optax.sgd(1.0)
        s0 = jax.jit(make_init_fn(cfg, model, tx))(jax.random.PRNGKey(0))
        b = int(cfg.data.batch_size)
        batch = {"image": jnp.asarray(x[:b]), "label": jnp.asarray(y[:b])}
        step = jax.jit(make_train_step(cfg, model, tx))
        s1 = s0
        for _ in range(4):  # zero-initialised output / residual layers pass gradients after a few steps
            s1, _ = step(s1, batch)
        n = int(cfg.model.num_classes)
        tables = [(a, c) for a, c in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params))
                  if a.ndim == 2 and a.shape[0] == n + 1]
        assert len(tables) == 1, [a.shape for a, _ in tables]
        a, c = tables[0]
        moved[p] = float(jnp.abs(c[n] - a[n]).max())
        assert float(jnp.abs(c[:n] - a[:n]).max()) > 0  # the real classes train in both cases
    assert moved[0.0] == 0.0 and moved[0.5] > 0, moved
