"""jaxdiff.nets.dense: the blocked kernel gradient against flax.linen.Dense (XLA's own autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxdiff.nets.dense import DENSE_GRAD_CHUNK_ROWS, Dense


def _uses_blocked_path(module, params, x):
    jaxpr = jax.make_jaxpr(lambda p: module.apply({"params": p}, x))(params)
    return "custom_jvp_call" in str(jaxpr)


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


def test_forward_mode_and_blocked_reverse_mode():
    """jax.jvp / jacfwd work (a custom_jvp, not a custom_vjp) and equal nn.Dense's; the kernel
    gradient reverse mode derives from the tangent is a scan over row blocks (the blocked sum)."""
    shape = (4, 32, 32, 24)
    x = jax.random.normal(jax.random.key(0), shape)
    ref, new = nn.Dense(16), Dense(16, conv_impl="matmul")
    p = ref.init(jax.random.key(1), x)["params"]
    dx = jax.random.normal(jax.random.key(2), shape)
    dp = jax.tree.map(lambda a: jnp.full_like(a, 0.1), p)
    y_ref, t_ref = jax.jvp(lambda p, x: ref.apply({"params": p}, x), (p, x), (dp, dx))
    y_new, t_new = jax.jit(lambda p, x, dp, dx: jax.jvp(
        lambda p, x: new.apply({"params": p}, x), (p, x), (dp, dx)))(p, x, dp, dx)
    np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t_new, t_ref, rtol=1e-5, atol=1e-5)
    jac = jax.jacfwd(lambda k: new.apply({"params": {**p, "kernel": k}}, x[:1, :4]).sum())(p["kernel"])
    np.testing.assert_allclose(jac, jnp.broadcast_to(x[:1, :4].sum((0, 1, 2))[:, None], jac.shape), rtol=1e-5)
    def grad_jaxpr(m):
        f = lambda k: m.apply({"params": {**p, "kernel": k}}, x).sum()  # noqa: E731
        return str(jax.make_jaxpr(jax.grad(f))(p["kernel"]))

    assert "scan" in grad_jaxpr(new) and "scan" not in grad_jaxpr(ref)


def test_bfloat16_kernel_gradient_sums_blocks_in_float32():
    """bf16 inputs: the blocked kernel gradient accumulates its blocks in float32, so it is as close
    to the float32 gradient as nn.Dense's bf16 gradient (XLA's dot accumulates in float32)."""
    shape = (8, 32, 32, 32)  # 8,192 rows: 4 blocks
    x = jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), shape[:-1] + (16,))
    ref = nn.Dense(16)
    p = ref.init(jax.random.key(2), x)["params"]

    def kgrad(m, dtype):
        pk = jax.tree.map(lambda a: a.astype(dtype), p)
        f = lambda k: jnp.sum(m.apply({"params": {**pk, "kernel": k}}, x.astype(dtype)).astype(jnp.float32) * g)  # noqa: E731
        return np.asarray(jax.jit(jax.grad(f))(pk["kernel"]), np.float64)

    exact = kgrad(ref, jnp.float32)
    err_new = np.linalg.norm(kgrad(Dense(16, conv_impl="matmul"), jnp.bfloat16) - exact)
    err_ref = np.linalg.norm(kgrad(ref, jnp.bfloat16) - exact)
    assert err_new <= 1.5 * err_ref + 1e-6 * np.linalg.norm(exact), (err_new, err_ref)
