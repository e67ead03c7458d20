"""diffusion.variance="learned_range" through the trainer and the sampler: the bound trains the
variance half of a DiT's outputs (untouched without it), ddpm samples with the learned variances,
with and without classifier-free guidance, and the configs are checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance
from jaxdiff.config_base import check_config
from jaxdiff.generate import make_sample_fn
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from jaxdiff.train.step import make_train_step
from tests.helpers import load_config


def _tiny(variance):
    cfg = load_config("imagenet256_dit", "tiny")
    with cfg.unlocked():
        cfg.diffusion.variance = variance
        cfg.optim.warmup_steps = 0
        cfg.optim.lr = 1e-3
    return cfg


def _variance_columns(params, channels):
    """The final Dense's kernel columns that produce the variance channels (unpatchify keeps the
    channel as the fastest axis of each patch)."""
    k = params["final_layer"]["linear"]["kernel"]
    co = 2 * channels
    return k[:, np.arange(k.shape[1]) % co >= channels]


@pytest.fixture(scope="module")
def trained():
    out = {}
    for variance in ("fixed", "learned_range"):
        cfg = _tiny(variance)
        model, tx = build_model(cfg), make_optimizer(cfg)
        state = make_init_fn(cfg, model, tx)(jax.random.key(0))
        step = jax.jit(make_train_step(cfg, model, tx))
        batch = {"image": jax.random.uniform(jax.random.key(1), (8, 8, 8, 1), minval=-1, maxval=1),
                 "label": jnp.arange(8) % 10}
        before = state.params
        state, metrics = step(state, batch)
        out[variance] = (cfg, model, before, state, metrics)
    return out


def test_bound_trains_the_variance_channels(trained):
    for variance, moved in (("fixed", False), ("learned_range", True)):
        cfg, model, before, state, metrics = trained[variance]
        assert np.isfinite(float(metrics["loss"])) and int(metrics["nonfinite"]) == 0
        change = float(jnp.max(jnp.abs(_variance_columns(state.params, 1) - _variance_columns(before, 1))))
        assert (change > 1e-5) == moved, (variance, change)
    # the hybrid loss is the mse plus a positive bound term: larger than the fixed-variance loss
    assert float(trained["learned_range"][4]["loss"]) > float(trained["fixed"][4]["loss"])


def test_ddpm_samples_with_the_learned_variances(trained):
    cfg, model, _, state, _ = trained["learned_range"]
    cfg = cfg.copy_and_resolve_references()  # edited below; the fixture's stays as trained
    # adaLN-Zero makes a fresh DiT's output ~0 whatever the label: perturb every weight so that the
    # labels, and hence guidance, change the samples
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    with cfg.unlocked():
        cfg.sample.clip_denoised = 1.0  # a random eps-network's x0_hat is huge at low alpha: keep samples O(1)
    y = jnp.arange(4) % 10
    key = jax.random.key(3)
    learned = make_sample_fn(cfg, model, "ddpm", 8, 4)(params, key, y)
    with cfg.unlocked():
        cfg.sample.variance = "fixed_small"
    small = make_sample_fn(cfg, model, "ddpm", 8, 4)(params, key, y)
    with cfg.unlocked():
        cfg.sample.variance = ""
    assert np.all(np.isfinite(np.asarray(learned))) and learned.shape == (4, 8, 8, 1)
    scale = float(jnp.max(jnp.abs(learned)))
    assert float(jnp.max(jnp.abs(learned - small))) > 1e-2 * scale  # the variance channels are read
    # guided: x0 guided, variance from the conditional branch; with scale 1 it is the plain sampler
    guided = make_sample_fn(cfg, model, "ddpm", 8, 4, guidance_override={"scale": 3.0})(params, key, y)
    assert np.all(np.isfinite(np.asarray(guided))) and float(jnp.max(jnp.abs(guided - learned))) > 1e-2 * scale
    interval = make_sample_fn(cfg, model, "ddpm", 8, 4,
                              guidance_override={"scale": 3.0, "interval": (1e-9, 1e9)})(params, key, y)
    np.testing.assert_allclose(np.asarray(interval), np.asarray(guided), atol=1e-5)
    # a partial interval mixes guided and conditional-only steps (the tuple output through jnp.where)
    partial = make_sample_fn(cfg, model, "ddpm", 8, 4,
                             guidance_override={"scale": 3.0, "interval": (0.5, 5.0)})(params, key, y)
    assert np.all(np.isfinite(np.asarray(partial)))
    assert min(float(jnp.max(jnp.abs(partial - guided))), float(jnp.max(jnp.abs(partial - learned)))) > 1e-3 * scale
    # other samplers read the prediction channels only
    assert make_sample_fn(cfg, model, "dpmpp_2m", 5, 4)(params, key, y).shape == (4, 8, 8, 1)


def test_guidance_passes_the_conditional_variance_through():
    def den(x, t, y):
        return x * (1.0 + y[:, None]), jnp.broadcast_to(y[:, None].astype(jnp.float32), x.shape)

    x = jnp.ones((3, 2))
    g, v = guidance.classifier_free_guidance(den, jnp.array([1, 2, 3]), jnp.zeros(3, jnp.int32), 2.0)(x, 0.5)
    np.testing.assert_allclose(np.asarray(v), np.broadcast_to(np.array([[1.0], [2.0], [3.0]]), (3, 2)))
    np.testing.assert_allclose(np.asarray(g), 1 + 2 * np.array([[1.0], [2.0], [3.0]]) * np.ones((3, 2)))


def test_config_checks():
    cfg = _tiny("learned_range")
    check_config(cfg)
    for key, value, match in [("diffusion.variance", "learned", "unknown config.diffusion.variance"),
                              ("sample.variance", "small", "unknown config.sample.variance"),
                              ("diffusion.t_density", "uniform", "t_density='default'")]:
        bad = _tiny("learned_range")
        with bad.unlocked():
            section, name = key.split(".")
            bad[section][name] = value
        with pytest.raises(ValueError, match=match):
            check_config(bad)
    bad = _tiny("fixed")
    with bad.unlocked():
        bad.sample.variance = "learned_range"
    with pytest.raises(ValueError, match="needs a model trained with"):
        check_config(bad)
    bad = _tiny("learned_range")
    with bad.unlocked():
        bad.model.learn_sigma = False
    model, tx = build_model(bad), make_optimizer(bad)
    state = make_init_fn(bad, model, tx)(jax.random.key(0))
    batch = {"image": jnp.zeros((8, 8, 8, 1)), "label": jnp.zeros(8, jnp.int32)}
    with pytest.raises(ValueError, match="model.learn_sigma=True"):
        make_train_step(bad, model, tx)(state, batch)


def test_ddpm_variance_defaults_and_refusals(trained):
    from jaxdiff.generate import ddpm_variance

    cfg_fixed, model_fixed, _, state_fixed, _ = trained["fixed"]
    cfg_learned = trained["learned_range"][0]
    assert ddpm_variance(cfg_fixed) == "fixed_small" and ddpm_variance(cfg_learned) == "learned_range"
    assert ddpm_variance(cfg_learned, "fixed_large") == "fixed_large"
    with pytest.raises(ValueError, match="option of the ddpm sampler"):
        make_sample_fn(cfg_fixed, model_fixed, "ddim", 3, 2, variance="fixed_large")
    with pytest.raises(ValueError, match="needs a model trained with"):
        make_sample_fn(cfg_fixed, model_fixed, "ddpm", 3, 2, variance="learned_range")
