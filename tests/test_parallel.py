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


def test_make_mesh_errors():
    n = jax.device_count()
    with pytest.raises(ValueError, match="at most one"):
        parallel.make_mesh(-1, -1)
    with pytest.raises(ValueError, match="does not cover"):
        parallel.make_mesh(n + 1, 1)


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
