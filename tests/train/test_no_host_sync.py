"""A real (tiny) train step does no host <-> device transfer once its inputs are on the device.

The step is jitted with ``donate_argnums=(0,)`` as in ``jaxdiff.train.loop``; under
``jax.transfer_guard("disallow")`` any implicit transfer (a Python scalar or numpy array fed to
the step, a ``float(...)`` / ``.item()`` inside it, a host callback) raises.
"""

import jax
import numpy as np
import pytest

from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from jaxdiff.train.step import make_train_step
from tests.helpers import load_config


def test_train_step_runs_under_transfer_guard():
    cfg = load_config("digits", "tiny")
    model = build_model(cfg)
    tx = make_optimizer(cfg.optim)
    state = jax.jit(make_init_fn(cfg, model, tx))(jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(cfg, model, tx), donate_argnums=(0,))
    b, s = int(cfg.data.batch_size), int(cfg.data.image_size)
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.standard_normal((b, s, s, int(cfg.data.channels)), np.float32)),
        "label": jax.device_put(rng.integers(0, 10, (b,), dtype=np.int32)),
    }
    state, _ = step(state, batch)  # compile outside the guard
    losses = []
    with jax.transfer_guard("disallow"):
        for _ in range(3):
            state, metrics = step(state, batch)
            losses.append(metrics["loss"])  # stays a device array: no sync in the loop
    assert int(state.step) == 4
    assert all(np.isfinite(float(v)) for v in losses)

    # The guard does catch a host transfer of the same kind (so the test can fail).
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="[Dd]isallowed"):
        step(state, {"image": np.asarray(batch["image"]), "label": batch["label"]})
