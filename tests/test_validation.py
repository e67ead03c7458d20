"""Every mistake a user can type gets an error that says what is wrong and what is valid:
config keys, sampler / dataset / network names, image shape vs model, a checkpoint from another
model config, and sampler arguments."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from jaxdiff.checkpoint import CheckpointManager, CheckpointMismatchError
from jaxdiff.config_base import check_config, unknown_key_message
from jaxdiff.data import DATA_NAMES, DatasetNotFoundError, make_source
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import check_data_shape, make_init_fn, train
from jaxdiff.train.state import make_optimizer
from tests.helpers import REPO, load_config


# --- config keys ------------------------------------------------------------------------------

def test_unknown_config_key_message_lists_valid_keys():
    cfg = load_config("digits", "tiny")
    msg = unknown_key_message(cfg, "optim.learning_rate")
    assert msg.startswith("unknown config key config.optim.learning_rate; valid keys of config.optim: ")
    assert all(k in msg for k in cfg.optim.keys())
    assert unknown_key_message(cfg, "trian.num_steps").endswith("Did you mean config.train?")
    assert "has no field 'x'" in unknown_key_message(cfg, "train.num_steps.x")
    assert unknown_key_message(cfg, "train.num_steps") is None


def test_cli_unknown_config_key_lists_valid_keys(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", "train", "--config=configs/digits.py:tiny",
         f"--workdir={tmp_path}", "--config.train.num_step=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert "unknown config key config.train.num_step; valid keys of config.train: " in proc.stderr
    assert "Did you mean config.train.num_steps?" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


@pytest.mark.parametrize("arg, says", [
    ("--config.train.num_steps=abc", "flag --config.train.num_steps=abc: invalid literal for int()"),
    ("--config.optim.lr=1e-3x", "flag --config.optim.lr=1e-3x: could not convert string to float"),
])
def test_cli_badly_typed_config_value_says_which_and_why(tmp_path, arg, says):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxdiff.cli", "train", "--config=configs/digits.py:tiny",
         f"--workdir={tmp_path}", arg],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1
    assert says in proc.stderr and "defined twice" not in proc.stderr
    assert "Traceback" not in proc.stderr and not os.listdir(tmp_path)


def _entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "jaxdiff")
    if not os.path.exists(exe):
        pytest.skip("the jaxdiff console script is not installed next to this Python")
    return exe


def test_cli_helpshort_lists_commands_and_flags():
    """Under the console-script entry point absl's help describes the script's own module: jaxdiff
    registers its docstring (the commands) and flags there."""
    proc = subprocess.run([_entry_point(), "--helpshort"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    out = proc.stdout + proc.stderr
    assert "jaxdiff sample --workdir" in out and "jaxdiff eval" in out
    for flag in ("--sampler", "--steps", "--workdir", "--guidance_scale", "--grid", "--config"):
        assert flag in out, flag


@pytest.mark.parametrize("command, args", [
    ("sample", ["--config=configs/digits.py:tiny", "--config.sample.steps=2"]),
    ("eval", ["--config=configs/digits.py:tiny"]),
    ("sample", ["--config.sample.steps=2"]),  # an override without a config file
])
def test_cli_sample_and_eval_refuse_config_overrides(tmp_path, command, args):
    """sample / eval use the checkpoint's saved config: --config(.*) would be silently ignored."""
    proc = subprocess.run(
        [_entry_point(), command, f"--workdir={tmp_path}", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert f"jaxdiff {command} rebuilds the model from the config saved with the checkpoint" in proc.stderr
    assert "--steps" in proc.stderr and "Traceback" not in proc.stderr


# --- names: sampler, dataset, network, options --------------------------------------------------

def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'; available: ") as info:
        samplers.get("dpm++")
    assert all(n in str(info.value) for n in samplers.available())
    cfg = load_config("digits", "tiny")
    cfg.sample.sampler = "dpmpp2m"
    with pytest.raises(ValueError, match="unknown sampler config.sample.sampler='dpmpp2m'; valid names: ") as info:
        check_config(cfg)
    assert "dpmpp_2m" in str(info.value)


def test_train_checks_config_before_doing_anything(tmp_path):
    cfg = load_config("toy2d", "tiny")
    cfg.sample.sampler = "nope"
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown sampler"):
        train(cfg, str(workdir), progress=False)
    assert not workdir.exists()  # failed before creating anything, not after training


def test_unknown_dataset_lists_valid_names():
    cfg = load_config("digits", "tiny")
    cfg.data.name = "mnist"
    with pytest.raises(ValueError, match="unknown dataset config.data.name='mnist'; valid names: digits, toy2d, tfds"):
        check_config(cfg)
    with pytest.raises(ValueError, match=f"valid names: {', '.join(DATA_NAMES)}"):
        make_source({"name": "mnist"})


def test_missing_tfds_dataset_names_dataset_and_data_dir(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetNotFoundError) as info:
        make_source({"name": "tfds", "tfds_name": "cifar10", "data_dir": str(tmp_path)})
    msg = str(info.value)
    assert "'cifar10'" in msg and str(tmp_path) in msg and "tfds build cifar10" in msg


def test_unknown_network_and_field_list_valid_names():
    cfg = load_config("digits", "tiny")
    cfg.model.name = "transformer"
    with pytest.raises(ValueError, match="unknown net name 'transformer'; valid names: "):
        build_model(cfg)
    cfg = load_config("digits", "tiny")
    cfg.model.chanels = 3
    with pytest.raises(ValueError, match="unknown field\\(s\\) \\['chanels'\\].*valid fields: "):
        build_model(cfg)


# --- shapes -------------------------------------------------------------------------------------

def test_image_shape_vs_model_config():
    cfg = load_config("digits", "tiny")
    cfg.data.image_size = 16  # digits are 8x8
    with pytest.raises(ValueError, match=r"yields examples of shape \(8, 8, 1\), but the config describes "
                                         r"\(16, 16, 1\).*--config.data.image_size=8 --config.data.channels=1"):
        check_data_shape(cfg, make_source(cfg.data, "train"))
    cfg.data.image_size = 8
    check_data_shape(cfg, make_source(cfg.data, "train"))  # the right shape passes

    cfg.data.image_size, cfg.model.ch_mult = 6, (1, 2, 2)
    with pytest.raises(ValueError, match=r"image_size=6 is not divisible by 2\*\*\(len\(config.model.ch_mult\)-1\)=4"):
        check_config(cfg)

    dit = load_config("imagenet256_dit", "tiny")
    check_config(dit)
    dit.data.image_size = 16
    with pytest.raises(ValueError, match="DiT is configured for 8x8x1 inputs.*data is 16x16x1"):
        check_config(dit)


def _abstract(cfg):
    return jax.eval_shape(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)), jax.random.PRNGKey(0))


def test_checkpoint_from_other_model_config_names_differing_shapes(tmp_path):
    cfg = load_config("toy2d", "tiny")
    state = jax.jit(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)))(jax.random.PRNGKey(0))
    ckpt = CheckpointManager(str(tmp_path), save_every=1, async_save=False)
    try:
        ckpt.save(1, state, cfg, force=True)
        ckpt.restore(_abstract(cfg), 1)  # the same config restores
        ckpt.restore_subtree(_abstract(cfg).ema["ema_0"], ("ema", "ema_0"), 1)  # and so does one part of it
        wider = load_config("toy2d", "tiny")
        wider.model.hidden = 48
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(_abstract(wider), 1)
        with pytest.raises(CheckpointMismatchError) as info_ema:
            ckpt.restore_subtree(_abstract(wider).ema["ema_0"], ("ema", "ema_0"), 1)
    finally:
        ckpt.close()
    # every params entry whose shape changed is named with both shapes (a restore of one EMA
    # copy: that copy's entries, which mirror the params)
    stored = jax.tree_util.tree_flatten_with_path(state.params)[0]
    wanted = dict(jax.tree_util.tree_flatten_with_path(_abstract(wider).params)[0])
    changed = [p for p, x in stored if x.shape != wanted[p].shape]
    assert changed
    for msg, prefix in ((str(info.value), "params/"), (str(info_ema.value), "ema/ema_0/")):
        assert "was written by a different model config" in msg and "parameter shape(s) differ" in msg
        for path, x in stored:
            name = prefix + "/".join(str(k.key) for k in path)
            line = f"{name}: checkpoint {tuple(x.shape)} vs config {tuple(wanted[path].shape)}"
            assert (line in msg) == (path in changed), line
        assert "config.json" in msg
    assert "opt_state" not in str(info_ema.value) and "EMA / optimizer-state" not in str(info_ema.value)


def test_checkpoint_with_another_optimizer_chain_says_so(tmp_path):
    """Same parameters, optim.grad_clip switched off: the optimizer chain's state differs, and the
    message says that rather than blaming the model config."""
    cfg = load_config("toy2d", "tiny")
    cfg.optim.grad_clip = 1.0
    state = jax.jit(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)))(jax.random.PRNGKey(0))
    no_clip = load_config("toy2d", "tiny")
    no_clip.optim.grad_clip = 0.0
    ckpt = CheckpointManager(str(tmp_path), save_every=1, async_save=False)
    try:
        ckpt.save(1, state, cfg, force=True)
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore(_abstract(no_clip), 1)
    finally:
        ckpt.close()
    msg = str(info.value)
    assert "same parameters but a different optimizer / EMA state" in msg and "grad_clip" in msg
    assert "different model config" not in msg and "opt_state/" in msg


# --- sampler arguments --------------------------------------------------------------------------

EDM = P.EDM()
GRID = S.make_grid(EDM, 4)


def _denoise(x, t):
    return 0.5 * x


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "ddpm"])
def test_sampler_validation(name):
    fn = samplers.get(name)
    x = jnp.ones((2, 3))
    key = jax.random.key(0)
    with pytest.raises(TypeError, match="x must be a jax or numpy array, got list"):
        fn(_denoise, [[1.0, 2.0]], GRID, key=key)
    with pytest.raises(TypeError, match="floating array .*got dtype int32.*astype"):
        fn(_denoise, jnp.ones((2, 3), jnp.int32), GRID, key=key)
    bad = S.Grid(t=GRID.t, alpha=GRID.alpha[:-1], sigma=GRID.sigma, process=EDM)
    with pytest.raises(ValueError, match="grid.alpha must be 1-D with the shape of grid.t"):
        fn(_denoise, x, bad, key=key)
    ints = S.Grid(t=GRID.t, alpha=GRID.alpha, sigma=jnp.ones(GRID.t.shape, jnp.int32), process=EDM)
    with pytest.raises(TypeError, match="grid.sigma must be floating"):
        fn(_denoise, x, ints, key=key)
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        fn(_denoise, x, GRID, key=jax.random.split(key, 3))
    with pytest.raises(TypeError, match="key must be one PRNG key"):
        jax.jit(lambda x: fn(_denoise, x, GRID, key=jnp.zeros((3, 2), jnp.uint32)))(x)  # eager: at trace time


def test_validate_min_steps():
    from jaxdiff.samplers.base import validate

    with pytest.raises(ValueError, match="my_sampler: the grid needs at least 3 points \\(2 step\\(s\\)\\)"):
        validate("my_sampler", jnp.ones(3), S.make_grid(EDM, 1), None, stochastic=False, min_steps=2)
    validate("my_sampler", jnp.ones(3), S.make_grid(EDM, 2), None, stochastic=False, min_steps=2)


# --- no pickle ----------------------------------------------------------------------------------

def test_no_pickle_in_library_or_scripts():
    """Checkpoints are Orbax + JSON; converted PyTorch weights must load with safetensors or
    ``torch.load(..., weights_only=True)``; numpy files with ``allow_pickle=False``."""
    import re

    offenders = []
    for root in ("jaxdiff", "scripts", "benchmarks", "experiments"):
        for dirpath, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    src = f.read()
                rel = os.path.relpath(path, REPO)
                if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", src, re.M):
                    offenders.append(f"{rel}: imports pickle")
                if "allow_pickle=True" in src:
                    offenders.append(f"{rel}: allow_pickle=True")
                for m in re.finditer(r"torch\.load\(", src):
                    depth, i = 1, m.end()
                    while depth and i < len(src):
                        depth += {"(": 1, ")": -1}.get(src[i], 0)
                        i += 1
                    if "weights_only=True" not in src[m.end():i]:
                        offenders.append(f"{rel}: torch.load without weights_only=True")
    assert not offenders, offenders
