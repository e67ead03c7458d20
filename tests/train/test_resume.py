"""Resume from an Orbax checkpoint in a fresh process is bit-identical to an uninterrupted run;
``jaxdiff sample`` on the run writes a grid."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdiff.checkpoint import CheckpointManager, load_config_json
from jaxdiff.metrics.writer import read_metrics
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from tests.helpers import run_python

CFG = "configs/digits.py:tiny"
N = 3  # the tiny config checkpoints every 3 steps and trains 6


def _train(workdir, num_steps, cache):
    return run_python(["-m", "jaxdiff.cli", "train", f"--config={CFG}", f"--workdir={workdir}",
                       f"--config.train.num_steps={num_steps}", "--config.sample.num=0", "--noprogress"],
                      cache_dir=cache)


def _restore(workdir):
    cfg = load_config_json(os.path.join(workdir, "config.json"))
    model = build_model(cfg)
    abstract = jax.eval_shape(make_init_fn(cfg, model, make_optimizer(cfg.optim)), jax.random.PRNGKey(0))
    ckpt = CheckpointManager(str(workdir), save_every=1)
    try:
        return ckpt.latest_step(), ckpt.restore(abstract)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    cache = root / "jax_cache"
    straight, resumed = root / "straight", root / "resumed"
    _train(straight, 2 * N, cache)
    _train(resumed, N, cache)          # first process: N steps, checkpoint, exit
    out = _train(resumed, 2 * N, cache)  # fresh process: restore, N more
    return straight, resumed, out


def test_resume_is_bit_identical(runs):
    straight, resumed, out = runs
    assert "resumed from" in out.stdout + out.stderr
    la = [(r["step"], r["loss"]) for r in read_metrics(straight)]
    lb = [(r["step"], r["loss"]) for r in read_metrics(resumed)]
    assert [s for s, _ in la] == list(range(1, 2 * N + 1))
    assert la == lb  # same steps, bit-identical float losses
    step_a, a = _restore(straight)
    step_b, b = _restore(resumed)
    assert step_a == step_b == 2 * N
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    json.loads(out.stdout)["final_loss"]  # the summary is JSON on stdout


def test_config_saved_beside_checkpoint(runs):
    straight, _, _ = runs
    cfg = load_config_json(os.path.join(straight, "config.json"))
    assert cfg.model.name == "unet" and tuple(cfg.model.ch_mult) == (1, 2)
    ckpt = CheckpointManager(str(straight), save_every=1)
    try:
        assert ckpt.restore_config()["train"]["num_steps"] == 2 * N
        assert ckpt.all_steps() == [N, 2 * N]
    finally:
        ckpt.close()


def test_tensorboard_events_written(runs):
    straight, _, _ = runs
    files = os.listdir(os.path.join(straight, "tensorboard"))
    assert any(f.startswith("events.out.tfevents") for f in files)


def test_cli_sample_writes_grid(runs, tmp_path):
    straight, _, _ = runs
    out = tmp_path / "grid.png"
    proc = run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={straight}", "--sampler=ddim", "--steps=3",
                       "--num=12", f"--out={out}", "--noprogress"])
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["checkpoint_step"] == 2 * N and info["num"] == 12
    img = np.asarray(Image.open(out))
    # 10 columns x 2 rows of 8x8 digits, enlarged 8x with 1-pixel padding
    assert img.shape == (2 * 65 + 1, 10 * 65 + 1)
    assert img.std() > 0
