"""Each config's tiny variant trains end to end (2 steps, checkpoint, sample grid)."""

import os

import numpy as np
import pytest

from jaxdiff.train.loop import train
from tests.helpers import load_config

FAST = ["toy2d", "digits_flow", "imagenet256_dit"]
SLOW = ["cifar10_ddpm", "cifar10_edm"]


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


def test_learned_range_and_bf16_from_overrides_alone(tmp_path):
    """`--config.diffusion.variance=learned_range` on a UNet config trains (the output channels
    follow: 2 x the data's) and `--config.model.dtype=bfloat16` is a key every config has."""
    from jaxdiff.modeling import build_model

    cfg = load_config("digits", "tiny")
    assert cfg.model.dtype == "float32"
    cfg.diffusion.variance = "learned_range"
    cfg.model.dtype = "bfloat16"
    cfg.train.num_steps = 2
    cfg.sample.num = 0
    assert build_model(cfg).out_channels == 2
    summary = train(cfg, str(tmp_path), progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
