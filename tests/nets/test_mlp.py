"""Tests of the toy-data MLP (jaxdiff.nets.mlp)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import MLP, count_params

KEY = jax.random.key(0)
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
T = jnp.array([0.0, 10.0, 500.0, 999.0], jnp.float32)
Y = jnp.array([0, 1, 2, 1], jnp.int32)
MODEL = MLP(hidden=32, depth=2, num_classes=3, dropout=0.3)
MODEL_BF16 = MLP(hidden=32, depth=2, num_classes=3, dropout=0.3, dtype=jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("train", "bf16"))
def apply(params, x, t, y, key, train=False, bf16=False):
    model = MODEL_BF16 if bf16 else MODEL
    return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": key})


@pytest.fixture(scope="module")
def params():
    return jax.jit(MODEL.init)(KEY, X, T, Y)["params"]


def test_shapes_and_param_count(params):
    out = apply(params, X, T, Y, KEY)
    assert out.shape == (4, 2) and out.dtype == jnp.float32
    # temb 32*32+32 + 32*32+32; labels 4*32; dense_in 2*32+32; 2 x (cond + dense) 4*(32*32+32);
    # dense_out 32*2+2
    assert count_params(params) == 2 * 1056 + 128 + 96 + 4 * 1056 + 66
    model = MLP(hidden=16, depth=1, out_dim=5)
    s = jax.eval_shape(lambda: model.init_with_output(KEY, X, T)[0])
    assert s.shape == (4, 5) and s.dtype == jnp.float32


def test_output_depends_on_t_and_x(params):
    out = apply(params, X, T, Y, KEY)
    assert not np.allclose(out, apply(params, X, T + 50.0, Y, KEY), atol=1e-4)
    assert not np.allclose(out, apply(params, X + 1.0, T, Y, KEY), atol=1e-4)


def test_class_conditioning_and_null_class(params):
    assert params["label_emb"]["embedding_table"]["embedding"].shape == (4, 32)
    out = apply(params, X, T, Y, KEY)
    assert not np.allclose(out, apply(params, X, T, (Y + 1) % 3, KEY), atol=1e-4)
    out_none = apply(params, X, T, None, KEY)
    np.testing.assert_allclose(out_none, apply(params, X, T, jnp.full((4,), 3, jnp.int32), KEY),
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_none, out, atol=1e-4)


def test_labels_rejected_when_unconditional():
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(MLP(hidden=8).init, KEY, X, T, Y)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        jax.eval_shape(MLP(hidden=8).init, KEY, X[:, :, None], T)


def test_dropout_train_vs_eval(params):
    k1, k2 = jax.random.split(jax.random.key(1))
    np.testing.assert_array_equal(apply(params, X, T, Y, k1), apply(params, X, T, Y, k2))
    a, b = apply(params, X, T, Y, k1, train=True), apply(params, X, T, Y, k2, train=True)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(a, apply(params, X, T, Y, k1, train=True))


def test_jit_matches_eager(params):
    eager = MODEL.apply({"params": params}, X, T, Y)  # eval: no dropout rng needed
    np.testing.assert_allclose(apply(params, X, T, Y, KEY), eager, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_close_to_float32(params):
    out32 = apply(params, X, T, Y, KEY)
    out16 = apply(params, X, T, Y, KEY, bf16=True)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0.0 < rel < 0.05, rel


def test_scalar_t_broadcasts(params):
    out = apply(params, X, jnp.full((4,), 7.0), Y, KEY)
    out_scalar = MODEL.apply({"params": params}, X, 7.0, Y)
    np.testing.assert_allclose(out_scalar, out, rtol=1e-5, atol=1e-6)
