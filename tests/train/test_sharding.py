"""Data parallel over 8 CPU devices gives the same training as 1 device (to 1e-5 over 5 steps)."""

import json

import pytest

from tests.helpers import run_python

SCRIPT = r"""
import json, sys, jax, numpy as np
assert jax.device_count() == 8, jax.devices()
sys.path.insert(0, ".")
from tests.helpers import load_config
from jaxdiff.train.loop import train
from jaxdiff.metrics.writer import read_metrics
out = {}
for name, devices in [("one", jax.devices()[:1]), ("eight", jax.devices())]:
    cfg = load_config("digits", "tiny")
    cfg.train.num_steps = 5
    cfg.train.log_every = 1
    cfg.train.ckpt_every = 100
    cfg.model.dropout = 0.1  # exercise the dropout rng under sharding too
    wd = sys.argv[1] + "/" + name
    train(cfg, wd, progress=False, sample_at_end=False, devices=devices)
    out[name] = [r["loss"] for r in read_metrics(wd)]
from jaxdiff.checkpoint import CheckpointManager
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
cfg = load_config("digits", "tiny")
abstract = jax.eval_shape(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg.optim)), jax.random.PRNGKey(0))
params = {}
for name in ("one", "eight"):
    ck = CheckpointManager(sys.argv[1] + "/" + name, save_every=1)
    params[name] = jax.tree.leaves(ck.restore(abstract).params)
    ck.close()
out["max_param_diff"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                            for a, b in zip(params["one"], params["eight"]))
out["max_param"] = max(float(np.max(np.abs(np.asarray(a)))) for a in params["one"])
print(json.dumps(out))
"""


def test_eight_devices_match_one(tmp_path):
    proc = run_python(["-c", SCRIPT, str(tmp_path)],
                      env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["one"]) == 5
    for a, b in zip(out["one"], out["eight"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
    assert out["max_param_diff"] <= 1e-5 * max(1.0, out["max_param"])
