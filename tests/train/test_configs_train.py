"""Each config's tiny variant trains end to end (2 steps, checkpoint, sample grid)."""

import os

import numpy as np
import pytest

from jaxdiff.train.loop import train
from tests.helpers import load_config

FAST = ["toy2d", "imagenet256_dit"]
SLOW = ["digits_flow", "cifar10_ddpm", "cifar10_edm"]  # ~30 s or more each on CI's CPU


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_tiny_config_trains_and_samples(name, tmp_path):
    cfg = load_config(name, "tiny")
    cfg.train.num_steps = 2
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 2
    cfg.sample.steps = 2
    summary = train(cfg, str(tmp_path), progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert os.path.exists(summary["samples"]) and os.path.getsize(summary["samples"]) > 0
    assert os.path.isdir(os.path.join(tmp_path, "checkpoints", "2"))


def test_bfloat16_compute_trains(tmp_path):
    cfg = load_config("toy2d", "tiny")
    cfg.model.dtype = "bfloat16"
    cfg.train.num_steps = 3
    cfg.sample.num = 0
    summary = train(cfg, str(tmp_path), progress=False)
    assert np.isfinite(summary["final_loss"])


def test_too_few_classes_for_the_dataset_is_refused(tmp_path):
    """digits has 10 classes: a model with 5 would index past its label table (NaN loss, every
    step skipped as non-finite); the trainer refuses it before the first step."""
    cfg = load_config("digits", "tiny")
    cfg.model.num_classes = 5
    cfg.train.num_steps = 2
    with pytest.raises(ValueError, match="the dataset has 10 classes but config.model.num_classes=5"):
        train(cfg, str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == []  # checked before the state, checkpoints or logs


def test_learned_range_and_bf16_from_overrides_alone():
    """`--config.diffusion.variance=learned_range` on a UNet config gives the network 2 x the data's
    output channels (so the loss accepts it), and `--config.model.dtype=bfloat16` is a key every
    config has."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.losses import diffusion_loss
    from jaxdiff.modeling import build_model, build_process, net_fn

    for name in ("digits", "toy2d", "cifar10_ddpm", "imagenet256_dit"):
        assert load_config(name, "tiny").model.dtype == "float32", name
    cfg = load_config("digits", "tiny")
    cfg.diffusion.variance = "learned_range"
    cfg.model.dtype = "bfloat16"
    model = build_model(cfg)
    assert model.out_channels == 2 and model.dtype == jnp.bfloat16
    x0 = jnp.zeros((2, 8, 8, 1))
    params = jax.jit(model.init)(jax.random.key(0), x0, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))["params"]
    loss = diffusion_loss(net_fn(model, params, jnp.zeros((2,), jnp.int32)), x0, jax.random.key(1),
                          process=build_process(cfg), prediction=cfg.diffusion.prediction, variance="learned_range")
    assert np.isfinite(float(jnp.mean(loss)))
