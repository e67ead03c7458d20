"""jaxdiff.nets.dense: the blocked kernel gradient against flax.linen.Dense (XLA's own autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff.nets.dense import DENSE_GRAD_CHUNK_ROWS, Dense


def _uses_blocked_path(module, params, x):
    jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, x))(params)
    return "custom_vjp_call" in str(jaxpr)


@pytest.mark.parametrize("shape", [(4, 32, 32, 48), (2 * DENSE_GRAD_CHUNK_ROWS + 6 * 7, 24)])
def test_values_grads_and_params_match_nn_dense(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    ref, new = nn.Dense(40), Dense(40, conv_impl="matmul")
    p_ref = ref.init(jax.random.key(1), x)["params"]
    p_new = new.init(jax.random.key(1), x)["params"]
    assert jax.tree.map(jnp.shape, p_ref) == jax.tree.map(jnp.shape, p_new)
    np.testing.assert_array_equal(p_ref["kernel"], p_new["kernel"])
    assert _uses_blocked_path(new, p_new, x)
    g_out = jax.random.normal(jax.random.key(2), shape[:-1] + (40,))

    def loss(m, p, x):
        return jnp.sum(m.apply({"params": p}, x) * g_out)

    np.testing.assert_allclose(new.apply({"params": p_new}, x), ref.apply({"params": p_ref}, x), rtol=1e-6, atol=1e-6)
    g_ref = jax.jit(jax.grad(lambda p, x: loss(ref, p, x), argnums=(0, 1)))(p_ref, x)
    g_new = jax.jit(jax.grad(lambda p, x: loss(new, p, x), argnums=(0, 1)))(p_new, x)
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_new)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_ineligible_cases_are_plain_dense():
    small = jnp.ones((2, 8, 8, 16))  # 128 rows: below 2 * DENSE_GRAD_CHUNK_ROWS
    big = jnp.ones((4, 32, 32, 16))
    for m, x in [(Dense(8, conv_impl="matmul"), small), (Dense(8, conv_impl="xla"), big)]:
        p = m.init(jax.random.key(0), x)["params"]
        assert not _uses_blocked_path(m, p, x)
    auto = Dense(8)
    p = auto.init(jax.random.key(0), big)["params"]
    assert _uses_blocked_path(auto, p, big) == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="conv_impl"):
        Dense(8, conv_impl="bad")
