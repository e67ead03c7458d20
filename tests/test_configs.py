"""Every config loads, its tiny variant builds, and the reference configs have the papers' sizes."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from jaxdiff.modeling import build_model, build_process, data_shape, num_classes
from tests.helpers import REPO, load_config

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "configs", "*.py")))
REQUIRED = {"digits", "digits_flow", "toy2d", "cifar10_ddpm", "cifar10_edm", "imagenet256_dit"}


def _num_params(cfg):
    model = build_model(cfg)
    shape = data_shape(cfg)
    y = jnp.zeros((1,), jnp.int32) if num_classes(cfg) else None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), jnp.zeros((1,)), y))
    return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


def test_required_configs_exist():
    assert REQUIRED <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_and_tiny_variant_build(name):
    for variant in ("", "tiny"):
        cfg = load_config(name, variant)
        assert cfg.data.batch_size > 0
        build_process(cfg)
        assert _num_params(cfg) > 0 if variant == "tiny" or name in ("digits", "digits_flow", "toy2d") else True
    with pytest.raises(ValueError, match="tiny"):
        load_config(name, "nope")


def test_reference_parameter_counts():
    # DDPM CIFAR-10: 35.7M (Ho et al. 2020, App. B); DiT-XL/2: 675M (Peebles & Xie 2023, Table 1).
    assert _num_params(load_config("cifar10_ddpm")) == pytest.approx(35.7e6, rel=0.01)
    assert _num_params(load_config("imagenet256_dit")) == pytest.approx(675e6, rel=0.01)


def test_cli_rejects_unknown_config_key(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "train", "--config=configs/digits.py:tiny",
                           f"--workdir={tmp_path}", "--config.optim.learning_rate_typo=1.0"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "learning_rate_typo" in proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")
