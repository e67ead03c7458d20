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


def _parse_cli(spec, *overrides):
    """``--config=spec --config.a.b=v ...`` parsed as ``jaxdiff.cli`` does (lock_config=True)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["jaxdiff", f"--config={os.path.join(REPO, spec)}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_documented_keys_have_defaults_that_keep_runs_unchanged():
    """make_source's data keys and docs/scaling.md's mesh.rules are in base_config(), with the
    values their consumers fall back to when the key is absent."""
    from jaxdiff.config_base import base_config
    from jaxdiff.data import make_source
    from jaxdiff.train.loop import _mesh_rules

    c = base_config()
    assert (c.data.holdout_fraction, c.data.split_seed, c.data.seed, c.mesh.rules) == (0.1, 0, 0, ())
    assert _mesh_rules(c) == ()
    bare = {"name": "digits"}  # the consumers' own defaults
    for split in ("train", "test"):
        a, b = make_source(c.data, split), make_source(bare, split)
        assert (a.images == b.images).all() and (a.labels == b.labels).all()
    c.data.name, c.data.num_points = "toy2d", 256
    a, b = make_source(c.data), make_source({"name": "toy2d", "num_points": 256})
    assert (a.images == b.images).all()


def test_documented_keys_are_accepted_on_the_command_line_and_reach_their_consumer():
    from jaxdiff.data import load_digits, make_source
    from jaxdiff.train.loop import _mesh_rules

    cfg = _parse_cli("configs/digits.py:tiny", "--config.data.holdout_fraction=0.2", "--config.data.split_seed=3",
                     "--config.mesh.rules=(('Dense_0/kernel', (None, 'fsdp')),)")
    assert cfg.data.holdout_fraction == 0.2 and cfg.data.split_seed == 3
    test = make_source(cfg.data, "test")
    want_x, want_y = load_digits("test", holdout_fraction=0.2, seed=3)
    assert len(test) == len(want_y) == 360  # 20% of sklearn's 1,797 digits (10% by default: 180)
    assert (test.images == want_x).all() and (test.labels == want_y).all()
    default_split = load_digits("test", holdout_fraction=0.2, seed=0)[0]
    assert not (test.images == default_split).all()  # split_seed reached the split
    assert _mesh_rules(cfg) == (("Dense_0/kernel", (None, "fsdp")),)

    toy = _parse_cli("configs/toy2d.py:tiny", "--config.data.seed=5")
    from jaxdiff.data.toy2d import Toy2DSource

    got = make_source(toy.data)
    assert (got.images == Toy2DSource("gmm8", n=1024, seed=5).images).all()
    assert not (got.images == Toy2DSource("gmm8", n=1024, seed=0).images).all()
