"""nets.layers.dot_product_attention: values against a float64 numpy softmax(q k^T / sqrt(d)) v,
gradients against ``jax.nn.dot_product_attention``, large logits, and the bf16 contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.layers import dot_product_attention


def _qkv(shape, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    return tuple((spread * rng.standard_normal(shape)).astype(np.float32) for _ in range(3))


def _reference(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


@pytest.mark.parametrize("shape", [(2, 16, 1, 32), (2, 24, 3, 8)])
@pytest.mark.parametrize("spread", [1.0, 8.0])  # spread 8: logits in the hundreds
def test_values_match_float64_reference(shape, spread):
    q, k, v = _qkv(shape, spread=spread)
    out = np.asarray(jax.jit(dot_product_attention)(q, k, v))
    ref = _reference(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gradients_match_jax_nn():
    q, k, v = _qkv((2, 20, 2, 16), seed=1)
    g = np.random.default_rng(2).standard_normal(q.shape).astype(np.float32)
    ours = jax.jit(lambda *a: jax.vjp(dot_product_attention, *a)[1](g))(q, k, v)
    ref = jax.jit(lambda *a: jax.vjp(jax.nn.dot_product_attention, *a)[1](g))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_bfloat16_inputs_give_bfloat16_close_to_float32():
    q, k, v = _qkv((2, 16, 2, 16), seed=3)
    out = dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    ref = _reference(q, k, v)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.05 * np.abs(ref).max())
