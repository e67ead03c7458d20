"""Non-finite loss / gradients: the step keeps the old state and says so; ``train.nonfinite``
"skip" counts and goes on, "error" stops naming the step; no checkpoint holds NaN/Inf."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff.train.loop as loop
from jaxdiff.checkpoint import CheckpointManager
from jaxdiff.data import make_source
from jaxdiff.modeling import build_model
from jaxdiff.train.state import make_optimizer
from jaxdiff.train.step import make_train_step
from tests.helpers import load_config

BAD_STEP = 3  # 1-based: the 3rd step's batch carries a NaN


def _config(mode):
    cfg = load_config("toy2d", "tiny")
    cfg.train.nonfinite = mode
    cfg.train.num_steps = 6
    cfg.train.log_every = 3
    cfg.train.ckpt_every = 2
    cfg.train.tensorboard = False
    cfg.sample.num = 0
    return cfg


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _nan_batches(monkeypatch, bad_step):
    """Make the loop's data stream put a NaN into the batch of (1-based) step ``bad_step``."""
    real = loop.batch_iterator

    def batch_iterator(source, batch_size, *, start_step=0, **kw):
        it = real(source, batch_size, start_step=start_step, **kw)
        try:
            for step in range(start_step + 1, 10**9):
                batch = dict(next(it))
                if step == bad_step:
                    image = np.array(batch["image"], copy=True)
                    image.flat[0] = np.nan
                    batch["image"] = image
                yield batch
        finally:
            it.close()

    monkeypatch.setattr(loop, "batch_iterator", batch_iterator)


def test_step_keeps_state_on_nan_batch():
    cfg = _config("skip")
    model, tx = build_model(cfg), make_optimizer(cfg.optim)
    state = jax.jit(loop.make_init_fn(cfg, model, tx))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, model, tx))
    batch = make_source(cfg.data, "train")[np.arange(cfg.data.batch_size)]
    good = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
    bad = dict(good, image=good["image"].at[0, 0].set(jnp.nan))

    first, _ = step(state, good)  # lr warms up from 0: the first step does not move params
    after_good, m_good = step(first, good)
    assert int(m_good["nonfinite"]) == 0 and np.isfinite(float(m_good["loss"]))
    assert not _leaves_equal(after_good.params, first.params)  # a normal step moves the params

    after_bad, m_bad = step(after_good, bad)
    assert int(m_bad["nonfinite"]) == 1 and not np.isfinite(float(m_bad["loss"]))
    assert int(after_bad.step) == int(after_good.step) + 1  # the counter still advances
    for name in ("params", "opt_state", "ema"):
        assert _leaves_equal(getattr(after_bad, name), getattr(after_good, name)), name


def test_skip_counts_and_finishes(tmp_path, monkeypatch, capsys):
    _nan_batches(monkeypatch, BAD_STEP)
    summary = loop.train(_config("skip"), str(tmp_path), progress=False)
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 1
    assert np.isfinite(summary["final_loss"])
    assert f"skipped 1 update(s) with non-finite loss or gradients at step(s) {BAD_STEP}" in capsys.readouterr().err
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["nonfinite"]] == [BAD_STEP]
    assert np.isnan(rows[BAD_STEP - 1]["loss"])
    assert np.isfinite([r["loss"] for r in rows if not r["nonfinite"]]).all()


def test_error_names_step_and_writes_no_nonfinite_checkpoint(tmp_path, monkeypatch):
    _nan_batches(monkeypatch, BAD_STEP)
    with pytest.raises(FloatingPointError, match=f"non-finite loss or gradients at step {BAD_STEP} "):
        loop.train(_config("error"), str(tmp_path), progress=False)
    ckpt = CheckpointManager(str(tmp_path), save_every=1)
    try:
        assert ckpt.all_steps() == [2]  # the save due at step 4 came after the NaN: not written
    finally:
        ckpt.close()


def test_unknown_nonfinite_mode_lists_valid():
    cfg = _config("ignore")
    with pytest.raises(ValueError, match="unknown train.nonfinite 'ignore'; valid: skip, error"):
        make_train_step(cfg, build_model(cfg), make_optimizer(cfg.optim))


def test_save_refuses_nonfinite_params(tmp_path):
    class State:  # what the manager reads: params and EMA copies
        params = {"w": jnp.array([1.0, jnp.inf])}
        ema = {"ema_0": {"w": jnp.ones(2)}}

    cfg = _config("skip")
    ckpt = CheckpointManager(str(tmp_path), save_every=1)
    try:
        with pytest.raises(FloatingPointError, match="refusing to write the checkpoint at step 5"):
            ckpt.save(5, State(), cfg, force=True)
        assert ckpt.all_steps() == [] and os.listdir(ckpt.directory) == []
    finally:
        ckpt.close()


@pytest.mark.parametrize("use_cond", [True, False])
def test_apply_if_ok_both_forms(use_cond):
    from jaxdiff.train.step import apply_if_ok

    old = ({"w": jnp.arange(3.0)}, jnp.int32(4))
    update = lambda o: ({"w": o[0]["w"] * 2}, o[1] + 1)  # noqa: E731
    f = jax.jit(lambda ok, o: apply_if_ok(ok, update, o, use_cond=use_cond))
    new = f(jnp.bool_(True), old)
    np.testing.assert_array_equal(np.asarray(new[0]["w"]), [0.0, 2.0, 4.0])
    assert int(new[1]) == 5
    kept = f(jnp.bool_(False), old)
    assert _leaves_equal(kept, old)
    hlo = f.lower(jnp.bool_(True), old).as_text()
    assert ("stablehlo.case" in hlo or "stablehlo.if" in hlo) == use_cond


@pytest.mark.parametrize("field, value, message", [
    ("eps", 0.0, "config.optim.eps=0.0 is invalid: must be > 0 and finite"),
    ("b1", 1.0, r"config.optim.b1=1.0 is invalid: must be in \[0, 1\)"),
    ("b2", 1.5, r"config.optim.b2=1.5 is invalid: must be in \[0, 1\)"),
    ("lr", float("nan"), "config.optim.lr=nan is invalid: must be >= 0 and finite"),
    ("weight_decay", -0.1, "config.optim.weight_decay=-0.1 is invalid"),
    ("grad_clip", -1.0, "config.optim.grad_clip=-1.0 is invalid: must be > 0"),
])
def test_optimizer_rejects_settings_that_make_finite_grads_nonfinite(field, value, message):
    """The guard checks only the loss and gradients; AdamW with eps = 0 (0 / 0 on a zero
    gradient) or b = 1 (bias correction 1 - b**t = 0) would write NaN into the params unseen."""
    cfg = _config("skip")
    make_optimizer(cfg.optim)  # the defaults are fine
    cfg.optim[field] = value
    with pytest.raises(ValueError, match=message):
        make_optimizer(cfg.optim)
