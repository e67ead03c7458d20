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
