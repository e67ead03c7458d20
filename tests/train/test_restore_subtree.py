"""Sampling reads only the weights it samples with.

:func:`jaxdiff.eval.restore_for_sampling` restores one subtree of the checkpoint (the raw params
or one EMA copy, :meth:`jaxdiff.checkpoint.CheckpointManager.restore_subtree`), not the whole
train state. The checkpoint here is written on 2 (host-platform) devices, fsdp-sharded, by an
MLP (``configs/toy2d.py``, 256 wide: 528k parameters) with three EMA copies and random values
in every array of the state, so picking the wrong copy shows; it is restored here on 1.
"""

import json

import jax
import numpy as np
import pytest
import tensorstore as ts

from jaxdiff import parallel
from jaxdiff.checkpoint import CheckpointManager, config_from_json
from jaxdiff.eval import restore_for_sampling
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import abstract_train_state, sampling_params
from jaxdiff.train.state import make_optimizer
from tests.helpers import run_python

TWO = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
WHICH = ("params", "", "ema_1", "ema_hl")  # "" is the default, the first EMA copy: ema_0

WRITE = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, ".")
from tests.helpers import load_config
from jaxdiff import parallel
from jaxdiff.checkpoint import CheckpointManager
from jaxdiff.eval import restore_for_sampling
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import abstract_train_state
from jaxdiff.train.state import make_optimizer

root = sys.argv[1]
assert jax.device_count() == 2
cfg = load_config("toy2d")
cfg.ema.decays, cfg.ema.half_life_images = (0.9, 0.99), 1000.0
cfg.mesh.fsdp = 2
abstract, shardings = abstract_train_state(cfg, build_model(cfg), make_optimizer(cfg), parallel.make_mesh(-1, 2))
rng = np.random.default_rng(0)  # every float array its own values: the copies differ, none compresses away
state = jax.device_put(jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype)
                                    if np.issubdtype(a.dtype, np.floating) else np.zeros(a.shape, a.dtype),
                                    abstract), shardings)
ckpt = CheckpointManager(root + "/wd", save_every=1, async_save=False)
ckpt.save(3, state, cfg, force=True)
ckpt.close()
out = {}
for which in sys.argv[2:]:
    _, _, params, step = restore_for_sampling(root + "/wd", which)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    out[which] = {"step": step, "sharded": sum(not x.sharding.is_fully_replicated for _, x in leaves)}
    np.savez(f"{root}/two_{which or 'default'}.npz", **{jax.tree_util.keystr(k): np.asarray(x) for k, x in leaves})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore_subtree")
    proc = run_python(["-c", WRITE, str(root), *WHICH], env_extra=TWO)
    return root, str(root / "wd"), json.loads(proc.stdout.strip().splitlines()[-1])


def _full_restore(wd):
    """The whole train state, as restore_for_sampling restored it before it read one subtree."""
    ckpt = CheckpointManager(wd, save_every=1)
    try:
        config = config_from_json(ckpt.restore_config())
        abstract, _ = abstract_train_state(config, build_model(config), make_optimizer(config),
                                           parallel.make_mesh(-1, 1))
        return ckpt.restore(abstract)
    finally:
        ckpt.close()


def _bytes_read() -> int:
    """Bytes tensorstore has read from files in this process so far."""
    return sum(v["value"] for m in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
               for v in m["values"])


def test_partial_restore_equals_the_subtree_of_a_full_restore(run):
    _, wd, _ = run
    full = _full_restore(wd)
    for which in WHICH:
        _, _, params, step = restore_for_sampling(wd, which)
        want = sampling_params(full, which)
        assert step == 3
        assert jax.tree.structure(params) == jax.tree.structure(want)
        for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
            assert got.sharding == ref.sharding and got.dtype == ref.dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # the copies differ, so a wrong pick would have shown
    copies = [full.params, *(full.ema[k] for k in ("ema_0", "ema_1", "ema_hl"))]
    kernels = [np.asarray(jax.tree.leaves(c)[-1]) for c in copies]
    assert all(not np.array_equal(a, b) for i, a in enumerate(kernels) for b in kernels[i + 1:])


def test_unknown_copy_names_the_available_ones(run):
    _, wd, _ = run
    with pytest.raises(ValueError, match=r"no EMA copy 'ema_9'; available: params, ema_0, ema_1, ema_hl"):
        restore_for_sampling(wd, "ema_9")


def test_fsdp_checkpoint_from_two_devices_restores_on_one(run):
    root, wd, two = run
    assert jax.device_count() == 1
    for which in WHICH:
        assert two[which]["step"] == 3 and two[which]["sharded"] > 0  # fsdp-sharded on 2 devices
        _, _, params, _ = restore_for_sampling(wd, which)
        got = {jax.tree_util.keystr(k): np.asarray(x) for k, x in jax.tree_util.tree_leaves_with_path(params)}
        with np.load(root / f"two_{which or 'default'}.npz") as want:
            assert sorted(got) == sorted(want.files)
            for k in got:
                np.testing.assert_array_equal(got[k], want[k])


def test_sampling_reads_one_copy_of_the_weights_not_the_state(run):
    """tensorstore's count of the bytes read from the checkpoint's files: a full restore reads
    params, both Adam moments and three EMA copies (six copies); sampling reads one."""
    _, wd, _ = run
    before = _bytes_read()
    _, _, params, _ = restore_for_sampling(wd, "ema_1")
    partial = _bytes_read() - before
    before = _bytes_read()
    _full_restore(wd)
    full = _bytes_read() - before
    one_copy = sum(x.nbytes for x in jax.tree.leaves(params))
    assert one_copy > 500_000
    assert 0.8 * one_copy < partial < 1.2 * one_copy, (partial, one_copy)
    assert full > 5 * one_copy, (full, one_copy)
