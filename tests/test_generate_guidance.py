"""Classifier-free guidance through the config path (config.sample.guidance_*): generate / make_sample_fn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.generate import guidance_settings, make_sample_fn
from jaxdiff.modeling import build_model, conditional_denoiser, denoiser
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from tests.helpers import load_config


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("digits", "tiny")
    model = build_model(cfg)
    state = jax.jit(make_init_fn(cfg, model, make_optimizer(cfg.optim)))(jax.random.PRNGKey(0))
    # random output layers are zero-initialised: perturb every param so the labels matter
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return cfg, model, params


def test_config_guidance_scale_one_is_the_conditional_model(tiny):
    cfg, model, params = tiny
    y = jnp.arange(8) % 10
    key = jax.random.PRNGKey(3)
    plain = make_sample_fn(cfg, model, "ddim", 4, 8)(params, key, y)
    one = make_sample_fn(cfg, model, "ddim", 4, 8, guidance_override={"scale": 1.0, "rescale": 0.7})(params, key, y)
    np.testing.assert_array_equal(plain, one)
    three = make_sample_fn(cfg, model, "ddim", 4, 8, guidance_override={"scale": 3.0})(params, key, y)
    assert float(jnp.max(jnp.abs(three - plain))) > 1e-3


def test_conditional_denoiser_null_label_is_the_unconditional_model(tiny):
    cfg, model, params = tiny
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
    d = conditional_denoiser(cfg, model, params)
    np.testing.assert_allclose(d(x, 500.0, jnp.full((4,), 10)), denoiser(cfg, model, params, None)(x, 500.0), atol=1e-6)
    assert float(jnp.max(jnp.abs(d(x, 500.0, jnp.arange(4)) - d(x, 500.0, jnp.full((4,), 10))))) > 0


def test_guidance_settings_and_errors():
    cfg = load_config("digits", "tiny")
    assert guidance_settings(cfg) == {"scale": 1.0, "interval": None, "rescale": 0.0, "channels": None}
    cfg.sample.guidance_scale = 3.0
    cfg.sample.guidance_interval = (0.3, 5.0)
    assert guidance_settings(cfg) == {"scale": 3.0, "interval": (0.3, 5.0), "rescale": 0.0, "channels": None}
    unc = load_config("toy2d", "tiny")
    assert int(unc.model.get("num_classes", 0) or 0) == 0
    with pytest.raises(ValueError, match="class-conditional"):
        make_sample_fn(unc, build_model(unc), "ddim", 4, 8, guidance_override={"scale": 2.0})


def test_guidance_on_a_model_trained_without_label_dropout_warns(tiny):
    """class_dropout = 0: the null class never trained, so guidance extrapolates from nothing."""
    import warnings

    cfg, model, _ = tiny
    cfg = cfg.copy_and_resolve_references()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sample_fn(cfg, model, "ddim", 2, 4, guidance_override={"scale": 3.0})  # default dropout 0.1
    cfg.diffusion.class_dropout = 0.0
    with pytest.warns(RuntimeWarning, match="class_dropout=0: its null-class"):
        make_sample_fn(cfg, model, "ddim", 2, 4, guidance_override={"scale": 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_sample_fn(cfg, model, "ddim", 2, 4, guidance_override={"scale": 1.0})  # unguided: no warning


def test_guided_sampling_without_labels_is_an_error(tiny):
    """With guidance on, y=None would silently sample the unguided model: it raises instead."""
    cfg, model, params = tiny
    fn = make_sample_fn(cfg, model, "ddim", 2, 4, guidance_override={"scale": 3.0})
    with pytest.raises(ValueError, match="guidance scale 3.0 needs class labels"):
        fn(params, jax.random.PRNGKey(0), None)


def test_config_sample_grid_and_clip_denoised(tiny):
    """config.sample.grid / clip_denoised (what `jaxdiff import` records from a diffusers
    scheduler) reach the sampler as the explicit arguments do."""
    cfg, model, params = tiny
    y = jnp.arange(4) % 10
    key = jax.random.PRNGKey(3)
    explicit = make_sample_fn(cfg, model, "ddim", 3, 4, grid_kind="leading", clip_denoised=0.2)(params, key, y)
    cfg2 = cfg.copy_and_resolve_references()
    cfg2.sample.grid, cfg2.sample.clip_denoised = "leading", 0.2
    np.testing.assert_array_equal(make_sample_fn(cfg2, model, "ddim", 3, 4)(params, key, y), explicit)
    unclipped = make_sample_fn(cfg, model, "ddim", 3, 4, grid_kind="leading")(params, key, y)
    assert float(jnp.max(jnp.abs(unclipped - explicit))) > 1e-3  # the clip is active here
