"""Layout rules of jaxdiff.parallel (pure shape logic; the numerics are in tests/train)."""

import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from jaxdiff import parallel


def test_largest_divisible_axis_is_split():
    assert parallel.param_partition_spec("params/conv/kernel", (3, 3, 64, 128), 8) == P(None, None, None, "fsdp")
    assert parallel.param_partition_spec("params/dense/kernel", (1152, 4608), 8) == P(None, "fsdp")
    # Only the axes fsdp divides qualify.
    assert parallel.param_partition_spec("x", (4608, 1155), 8) == P("fsdp", None)


def test_small_scalar_and_indivisible_arrays_stay_replicated():
    assert parallel.param_partition_spec("params/norm/scale", (128,), 8) == P()
    assert parallel.param_partition_spec("step", (), 8) == P()
    assert parallel.param_partition_spec("x", (3, 3, 7, 1001), 8) == P()
    assert parallel.param_partition_spec("x", (3, 3, 64, 128), 1) == P()


def test_user_rules_come_first_and_must_divide():
    rules = (("conv/kernel", (None, None, "fsdp", None)),)
    assert parallel.param_partition_spec("params/conv/kernel", (3, 3, 64, 128), 8, rules=rules) == \
        P(None, None, "fsdp", None)
    # A rule whose axis fsdp does not divide falls back to the default.
    assert parallel.param_partition_spec("params/conv/kernel", (3, 3, 12, 128), 8, rules=rules) == \
        P(None, None, None, "fsdp")


def test_state_shardings_gives_moments_the_params_layout():
    import optax

    params = {"a": jax.ShapeDtypeStruct((64, 256), "float32"), "b": jax.ShapeDtypeStruct((256,), "float32")}
    opt = jax.eval_shape(optax.adamw(1e-3).init, params)
    mesh = parallel.make_mesh(1, 1)
    sh = parallel.state_shardings({"params": params, "opt": opt}, mesh)
    assert all(s.spec == P() for s in jax.tree.leaves(sh))  # fsdp = 1: replicated
    specs = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path({"params": params, "opt": opt}):
        specs[parallel._path_str(path)] = parallel.param_partition_spec(parallel._path_str(path), leaf.shape, 4)
    assert specs["params/a"] == P(None, "fsdp")
    mu = [k for k in specs if k.endswith("mu/a")]
    assert mu and all(specs[k] == specs["params/a"] for k in mu)


def test_make_mesh_axes_and_errors():
    # validation needs no real devices: four entries of the one CPU device stand for four devices
    four = [jax.devices()[0]] * 4
    # fsdp=-1 with the config's default data=-1: every device on fsdp (the docs' table row)
    assert dict(parallel.make_mesh(-1, -1, devices=four).shape) == {"data": 1, "fsdp": 4}
    assert dict(parallel.make_mesh(-1, 2, devices=four).shape) == {"data": 2, "fsdp": 2}
    # resuming an fsdp=8 run on 4 devices: says what to set
    with pytest.raises(ValueError, match=r"mesh.fsdp=8 does not divide the 4 device\(s\).*--config.mesh.fsdp"):
        parallel.make_mesh(-1, 8, devices=four)
    with pytest.raises(ValueError, match="mesh.data=3 does not divide"):
        parallel.make_mesh(3, 1, devices=four)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"mesh.fsdp must be a positive device count or -1.*got {bad}"):
            parallel.make_mesh(-1, bad, devices=four)
    with pytest.raises(ValueError, match="data=2 x fsdp=4 = 8 devices, but this run sees 4"):
        parallel.make_mesh(2, 4, devices=four)


def test_rules_naming_data_check_the_data_axis_size():
    rules = (("kernel", ("data", None)),)
    # data=4 does not divide 6: the rule falls through to the default (fsdp=2 divides 1024)
    assert parallel.param_partition_spec("params/kernel", (6, 1024), 2, rules=rules, data=4) == P(None, "fsdp")
    assert parallel.param_partition_spec("params/kernel", (8, 1024), 2, rules=rules, data=4) == P("data", None)
    # a tuple entry splits over the product of its axes
    both = (("kernel", (("data", "fsdp"), None)),)
    assert parallel.param_partition_spec("params/kernel", (8, 1024), 2, rules=both, data=4) == P(("data", "fsdp"), None)
    assert parallel.param_partition_spec("params/kernel", (12, 1024), 2, rules=both, data=4) == P(None, "fsdp")
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        parallel.param_partition_spec("params/kernel", (8, 1024), 2, rules=(("kernel", ("model", None)),))


def test_initialize_distributed_reads_the_process_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.initialize_distributed() is False and calls == []
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.initialize_distributed() is True
    assert calls[-1] == {"num_processes": 2, "process_id": 1}  # jax reads the address itself
    assert parallel.initialize_distributed(process_id=0) is True
    assert calls[-1] == {"num_processes": 2, "process_id": 0}  # explicit arguments win
    monkeypatch.setenv("JAX_PROCESS_ID", "one")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        parallel.initialize_distributed()


def test_memory_estimate_divides_by_fsdp():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("memory_estimate", os.path.join(root, "scripts", "memory_estimate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = {"w": jax.ShapeDtypeStruct((1024, 512), "float32"), "b": jax.ShapeDtypeStruct((512,), "float32")}
    full = mod.per_device_bytes({"params": params}, 1)
    eight = mod.per_device_bytes({"params": params}, 8)
    assert full["params"] == (1024 * 512 + 512) * 4
    assert eight["params"] == 1024 * 512 * 4 // 8 + 512 * 4
    assert math.isclose(full["total"], full["params"])
