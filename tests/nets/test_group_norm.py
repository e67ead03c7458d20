"""jaxdiff's GroupNorm (per-channel sums, then per group) against flax.linen.GroupNorm.

Reference: flax's own implementation of the same operator (Wu & He 2018), and a float64 numpy
evaluation of the definition.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff.nets.layers import GroupNorm, Norm32, group_norm

CASES = [((2, 8, 8, 16), 4), ((3, 5, 7, 12), 3), ((2, 6, 24), 8), ((4, 4, 4, 4, 8), 2), ((2, 3, 32), 32)]


def _numpy_group_norm(x, groups, scale, bias, eps):
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    xr = x.reshape(b, -1, groups, c // groups)
    mean = xr.mean(axis=(1, 3), keepdims=True)
    var = xr.var(axis=(1, 3), keepdims=True)
    y = ((xr - mean) / np.sqrt(var + eps)).reshape(x.shape)
    return y * np.asarray(scale, np.float64) + np.asarray(bias, np.float64)


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_flax_and_the_definition(case):
    shape, groups = case
    kx, ks, kb, kg = jax.random.split(jax.random.key(0), 4)
    # An offset mean and a per-channel spread, so that the statistics matter.
    spread = jnp.linspace(0.5, 2.0, shape[-1]).reshape((1,) * (len(shape) - 1) + (-1,))
    x = 3.0 + 2.0 * jax.random.normal(kx, shape) * spread
    params = {"params": {"scale": 1.0 + 0.1 * jax.random.normal(ks, shape[-1:]),
                         "bias": 0.1 * jax.random.normal(kb, shape[-1:])}}
    ours = GroupNorm(num_groups=groups, epsilon=1e-6)
    theirs = nn.GroupNorm(num_groups=groups, epsilon=1e-6)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == \
        jax.tree.map(jnp.shape, theirs.init(jax.random.key(1), x))
    y = jax.jit(ours.apply)(params, x)  # jitted: one compile each instead of op-by-op dispatch
    np.testing.assert_allclose(y, jax.jit(theirs.apply)(params, x), rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(
        y, _numpy_group_norm(x, groups, params["params"]["scale"], params["params"]["bias"], 1e-6),
        rtol=2e-5, atol=2e-5)
    # Gradients with respect to the input and both parameters agree with flax's.
    g = jax.random.normal(kg, shape)
    gr_ours = jax.jit(jax.grad(lambda p, x: jnp.sum(ours.apply(p, x) * g), argnums=(0, 1)))(params, x)
    gr_theirs = jax.jit(jax.grad(lambda p, x: jnp.sum(theirs.apply(p, x) * g), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(gr_ours), jax.tree.leaves(gr_theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_without_affine_and_errors():
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 8))
    ours = GroupNorm(num_groups=2, use_scale=False, use_bias=False)
    assert ours.init(jax.random.key(0), x) == {}
    y = ours.apply({}, x).reshape(2, -1, 2, 4)
    np.testing.assert_allclose(y.mean(axis=(1, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(1, 3)), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="divisible"):
        group_norm(x, 3)


def test_norm32_param_tree_unchanged():
    """Norm32 keeps the ``norm/{scale,bias}`` parameter paths of the flax GroupNorm it replaced."""
    p = Norm32(num_groups=4).init(jax.random.key(0), jnp.ones((1, 4, 4, 16)))
    assert jax.tree.map(jnp.shape, p) == {"params": {"norm": {"bias": (16,), "scale": (16,)}}}


def test_bf16_compute_keeps_float32_statistics():
    """dtype=bf16 computes the statistics in float32, as flax's GroupNorm does: an offset
    activation (mean 3, std 0.5) loses its variance to E[x^2] - E[x]^2 in bf16."""
    x = 3.0 + 0.5 * jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
    want = _numpy_group_norm(x, 4, np.ones(16), np.zeros(16), 1e-6)
    ours = GroupNorm(num_groups=4, dtype=jnp.bfloat16)
    theirs = nn.GroupNorm(num_groups=4, dtype=jnp.bfloat16, epsilon=1e-6)
    got = ours.apply(ours.init(jax.random.key(1), x), x)
    ref = theirs.apply(theirs.init(jax.random.key(1), x), x)
    assert got.dtype == jnp.bfloat16
    err = np.max(np.abs(np.asarray(got, np.float64) - want))
    assert err < 0.02, err  # bf16 output rounding; bf16 statistics gave 0.59
    assert err <= 2 * np.max(np.abs(np.asarray(ref, np.float64) - want)) + 1e-3
