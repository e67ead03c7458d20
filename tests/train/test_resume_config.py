"""Resuming refuses a config that builds another network or process than the checkpoint's
(``jaxdiff.train.loop.check_resume_config``): a restore only checks shapes."""

import jax
import pytest

from jaxdiff.checkpoint import CheckpointManager, config_to_json
from jaxdiff.modeling import build_model
from jaxdiff.train import train
from jaxdiff.train.loop import check_resume_config, make_init_fn
from jaxdiff.train.state import make_optimizer
from tests.helpers import load_config


def test_same_network_and_process_pass_other_ones_are_named():
    saved = load_config("digits", "tiny")
    check_resume_config(config_to_json(saved), saved)
    same = load_config("digits", "tiny")
    same.model.dropout, same.model.dtype = 0.3, "bfloat16"  # how the step runs: allowed
    same.model.norm_eps = 1e-6  # UNet's default, now set explicitly: the same network
    same.optim.lr, same.diffusion.weighting = 1e-5, "min_snr"  # training choices: allowed
    same.model.out_channels = 1  # None means the data's channels: 1 for digits
    check_resume_config(config_to_json(saved), same)
    heads = load_config("digits", "tiny")
    heads.model.head_dim, heads.model.num_heads = 16, 1
    heads2 = load_config("digits", "tiny")
    heads2.model.head_dim, heads2.model.num_heads = 16, 4  # num_heads is unused when head_dim is set
    check_resume_config(config_to_json(heads), heads2)

    other = load_config("digits", "tiny")
    other.model.freq_shift = 0.0  # same shapes, another time embedding
    other.diffusion.prediction = "v_prediction"
    other.diffusion.process.beta_schedule = "squaredcos_cap_v2"
    with pytest.raises(ValueError) as e:
        check_resume_config(config_to_json(saved), other)
    msg = str(e.value)
    assert "model.freq_shift: checkpoint 1.0 vs config 0.0" in msg
    assert "diffusion.prediction: checkpoint 'epsilon' vs config 'v_prediction'" in msg
    assert "diffusion.process" in msg and "squaredcos_cap_v2" in msg
    assert "model.dropout" not in msg

    edm = load_config("digits", "tiny")
    edm.diffusion.prediction = "edm"
    edm2 = load_config("digits", "tiny")
    edm2.diffusion.prediction, edm2.diffusion.sigma_data = "edm", 0.7
    with pytest.raises(ValueError, match="diffusion.sigma_data: checkpoint 0.5 vs config 0.7"):
        check_resume_config(config_to_json(edm), edm2)


def test_train_refuses_to_resume_with_another_model(tmp_path):
    cfg = load_config("toy2d", "tiny")
    state = jax.jit(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)))(jax.random.PRNGKey(0))
    ckpt = CheckpointManager(str(tmp_path), save_every=1, async_save=False)
    ckpt.save(1, state, cfg, force=True)
    ckpt.close()
    other = load_config("toy2d", "tiny")
    other.diffusion.prediction = "sample"
    with pytest.raises(ValueError, match=r"(?s)cannot resume .*checkpoints/1 with this config.*diffusion.prediction"):
        train(other, str(tmp_path), progress=False, sample_at_end=False)
