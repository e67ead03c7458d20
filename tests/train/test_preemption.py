"""Training survives preemption and kills, in real subprocesses of ``jaxdiff train``:

* SIGTERM mid-run: the process finishes the step, writes a checkpoint at it and exits 0;
* ``kill -9`` while a checkpoint is being written: the next run says it skipped the incomplete
  checkpoint and resumes from the last complete one;
* the resumed runs end with params bit-identical to an uninterrupted run of the same length.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from jaxdiff.checkpoint import KILL_DURING_SAVE_ENV, CheckpointManager, load_config_json
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from tests.helpers import REPO, run_python

CFG = "configs/toy2d.py:tiny"  # an MLP: compiles in seconds


def _args(workdir, num_steps, ckpt_every, log_every=1):
    return ["-m", "jaxdiff.cli", "train", f"--config={CFG}", f"--workdir={workdir}",
            f"--config.train.num_steps={num_steps}", f"--config.train.ckpt_every={ckpt_every}",
            f"--config.train.log_every={log_every}", "--config.train.tensorboard=False",
            "--config.sample.num=0", "--noprogress"]


def _env(cache):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.endswith("\n"))


def _train_until_signal(workdir, cache, sig, min_steps=3, timeout=300):
    """Start a long run, send ``sig`` once ``min_steps`` steps are logged; return the process."""
    proc = subprocess.Popen([sys.executable, *_args(workdir, 10**6, 10**6)], cwd=REPO, env=_env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while _logged_steps(workdir) < min_steps:
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"training did not get going (rc {proc.returncode}):\n{out}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _restore(workdir):
    cfg = load_config_json(os.path.join(workdir, "config.json"))
    abstract = jax.eval_shape(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)), jax.random.PRNGKey(0))
    ckpt = CheckpointManager(str(workdir), save_every=1)
    try:
        return ckpt.latest_step(), ckpt.restore(abstract), ckpt.all_steps()
    finally:
        ckpt.close()


def _assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigterm_then_kill9_mid_save_then_resume_is_bit_identical(tmp_path):
    cache = tmp_path / "jax_cache"
    run, straight = tmp_path / "run", tmp_path / "straight"

    # 1. SIGTERM mid-run: exit 0, a checkpoint at the interrupted step k, a summary saying so.
    rc, out, err = _train_until_signal(run, cache, signal.SIGTERM)
    assert rc == 0, err[-3000:]
    summary = json.loads(out)
    k = summary["steps"]
    assert summary["interrupted"] == "SIGTERM" and k >= 3
    assert "SIGTERM received" in err
    step, _, steps = _restore(run)
    assert step == k and steps == [k]  # the only checkpoint is the one the signal asked for
    assert _logged_steps(run) == k  # every step up to k was logged, none after

    # 2. Resume, checkpoint every step, and get SIGKILLed while step k + 2 is being written (an
    #    asynchronous write, so that the kill lands mid-write, before Orbax's final rename).
    proc = subprocess.run([sys.executable, *_args(run, k + 4, 1), "--config.train.async_checkpoint=True"],
                          cwd=REPO, capture_output=True, text=True,
                          env={**_env(cache), KILL_DURING_SAVE_ENV: str(k + 2)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/{k}" in proc.stderr
    leftovers = [n for n in os.listdir(run / "checkpoints") if ".orbax-checkpoint-tmp" in n]
    assert leftovers and all(n.startswith(f"{k + 2}.") for n in leftovers), leftovers

    # 3. The next run skips the incomplete checkpoint, resumes from k + 1 and finishes.
    proc = run_python(_args(run, k + 4, 1000), cache_dir=cache)
    assert f"skipped incomplete checkpoint {run}/checkpoints/{leftovers[0]}" in proc.stderr
    assert f"resumed from {run}/checkpoints/{k + 1}" in proc.stderr
    assert json.loads(proc.stdout)["steps"] == k + 4
    assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(run / "checkpoints"))

    # 4. An uninterrupted run of k + 4 steps ends in the same state, bit for bit.
    run_python(_args(straight, k + 4, 1000), cache_dir=cache)
    step_a, a, _ = _restore(run)
    step_b, b, _ = _restore(straight)
    assert step_a == step_b == k + 4
    _assert_same_state(a, b)
