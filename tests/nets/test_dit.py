"""Tests of the Diffusion Transformer (jaxdiff.nets.dit).

As in test_unet.py, compiled functions take parameters as arguments and most parameters are
drawn with numpy from ``jax.eval_shape`` shapes (which also moves the net away from its
adaLN-Zero initialisation, whose output is identically zero).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import DIT_VARIANTS, DiT, count_params, dit
from jaxdiff.nets.layers import get_2d_sincos_pos_embed

# XLA compiles threefry bits slowly on CPU (per random draw site); the "unsafe_rbg" PRNG
# (XLA RngBitGenerator) compiles several times faster. The nets accept any key type; the MLP
# tests cover the default threefry keys.
KEY = jax.random.key(0, impl="unsafe_rbg")


def shapes(model, x, t, y=None):
    return jax.eval_shape(model.init, KEY, x, t, y)["params"]


def random_params(model, x, t, y=None, seed=0):
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key)
        if name == "kernel":
            a = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        elif name == "bias":
            a = 0.1 * rng.normal(size=s.shape)
        else:  # embedding tables
            a = rng.normal(size=s.shape)
        return jnp.asarray(a, s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes(model, x, t, y))


def inputs(b=2, hw=8, c=1, seed=1):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(b, hw, hw, c)), jnp.float32)
    t = jnp.asarray(rng.uniform(0, 1000, size=(b,)), jnp.float32)
    return x, t


TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
            num_classes=10, dropout=0.2)
MODEL = DiT(**TINY)
MODEL_BF16 = DiT(**TINY, dtype=jnp.bfloat16)
X, T = inputs()
Y = jnp.array([3, 7], jnp.int32)


@functools.partial(jax.jit, static_argnames=("train", "bf16"))
def apply_tiny(params, x, t, y, key, train=False, bf16=False):
    model = MODEL_BF16 if bf16 else MODEL
    return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": key})


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL, X, T, Y)


# ----------------------------------------------------------------------------------------------


def test_param_count_dit_xl2():
    """DiT-XL/2, 32x32x4 latents, 1000 classes, learn_sigma: 675M (reference 675,129,632).

    The reference counts its fixed sin-cos ``pos_embed`` buffer (256 tokens x 1152) as a
    parameter; here it is a constant, so the trainable count is 294,912 lower (0.04%).
    """
    model = dit("XL/2")
    assert (model.hidden_size, model.depth, model.num_heads, model.patch_size) == (1152, 28, 16, 2)
    assert model.num_classes == 1000 and model.learn_sigma and model.in_channels == 4
    n = count_params(
        shapes(model, jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    )
    assert abs(n - 675_129_632) / 675_129_632 < 0.01
    assert n + 256 * 1152 == 675_129_632


def test_dit_s2_shape_on_8x8():
    """DiT-S/2 on 8x8x1 input (16 tokens): output (B, 8, 8, 2) with learned sigma."""
    model = dit("S/2", input_size=8, in_channels=1, num_classes=10)
    x, t = inputs()
    p = shapes(model, x, t, Y)
    assert len([k for k in p if k.startswith("blocks_")]) == 12
    assert p["blocks_0"]["qkv"]["kernel"].shape == (384, 3 * 384)
    assert p["blocks_0"]["fc1"]["kernel"].shape == (384, 4 * 384)
    assert p["final_layer"]["linear"]["kernel"].shape == (384, 2 * 2 * 2)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t, Y), p)
    assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32


def test_real_init_output_is_zero():
    """adaLN-Zero: real ``init`` gives an identically zero output. DiT-S/2 widths (384, 6 heads,
    patch 2) with depth 2 instead of 12 to keep compilation short on CPU."""
    model = dit("S/2", input_size=8, in_channels=1, num_classes=10, depth=2)
    x, t = inputs()
    variables = jax.jit(model.init)(KEY, x, t, Y)
    assert set(variables) == {"params"}
    p = variables["params"]
    assert p["y_embedder"]["embedding_table"]["embedding"].shape == (11, 384)
    assert not jnp.any(p["blocks_0"]["adaLN_modulation"]["kernel"])
    assert not jnp.any(p["final_layer"]["linear"]["kernel"])
    assert float(jnp.std(p["blocks_0"]["qkv"]["kernel"])) > 0.01
    assert abs(float(jnp.std(p["t_embedder"]["dense0"]["kernel"])) - 0.02) < 0.003
    assert abs(float(jnp.std(p["y_embedder"]["embedding_table"]["embedding"])) - 0.02) < 0.005
    out = jax.jit(model.apply)(variables, x, t, Y)
    assert out.shape == (2, 8, 8, 2) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)


@pytest.mark.parametrize(
    "variant, size, c, learn_sigma",
    [("S/2", 8, 1, False), ("S/4", 16, 3, True), ("B/8", 32, 4, True)],
)
def test_output_shapes(variant, size, c, learn_sigma):
    model = dit(variant, input_size=size, in_channels=c, learn_sigma=learn_sigma)
    x, t = inputs(hw=size, c=c)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t), shapes(model, x, t))
    assert out.shape == (2, size, size, 2 * c if learn_sigma else c)
    assert out.dtype == jnp.float32


def test_forward_nonzero_and_depends_on_inputs(params):
    out = apply_tiny(params, X, T, Y, KEY)
    assert out.shape == (2, 8, 8, 2)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out).mean()) > 1e-2
    assert not np.allclose(out, apply_tiny(params, X, T + 100.0, Y, KEY), atol=1e-4)
    assert not np.allclose(out, apply_tiny(params, X + 1.0, T, Y, KEY), atol=1e-4)


def test_class_conditioning_and_null_class(params):
    assert params["y_embedder"]["embedding_table"]["embedding"].shape == (11, 64)
    out = apply_tiny(params, X, T, Y, KEY)
    out_other = apply_tiny(params, X, T, jnp.array([5, 5], jnp.int32), KEY)
    assert not np.allclose(out, out_other, atol=1e-3)
    out_null = apply_tiny(params, X, T, jnp.full((2,), 10, jnp.int32), KEY)
    out_none = apply_tiny(params, X, T, None, KEY)
    np.testing.assert_allclose(out_none, out_null, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_none, out, atol=1e-3)


def test_dropout_train_vs_eval(params):
    k1, k2 = jax.random.split(jax.random.key(7, impl="unsafe_rbg"))
    eval1, eval2 = apply_tiny(params, X, T, Y, k1), apply_tiny(params, X, T, Y, k2)
    np.testing.assert_array_equal(eval1, eval2)
    a = apply_tiny(params, X, T, Y, k1, train=True)
    b = apply_tiny(params, X, T, Y, k2, train=True)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(a, apply_tiny(params, X, T, Y, k1, train=True))


def test_bfloat16_compute_close_to_float32(params):
    out32 = apply_tiny(params, X, T, Y, KEY)
    out16 = apply_tiny(params, X, T, Y, KEY, bf16=True)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0.0 < rel < 0.05, rel


def test_patchify_unpatchify_are_consistent():
    """With no transformer blocks each token only sees its own patch: perturbing one input
    pixel changes exactly the output pixels of the same p x p patch."""
    model = DiT(**dict(TINY, depth=0, dropout=0.0))
    x, t = inputs(b=1)
    p = random_params(model, x, t)
    f = jax.jit(lambda p, x: model.apply({"params": p}, x, t))
    out = f(p, x)
    out2 = f(p, x.at[0, 5, 2, 0].add(3.0))  # pixel (5, 2) lies in patch (2, 1)
    changed = np.abs(np.asarray(out2 - out)).max(axis=(0, 3)) > 1e-6
    expected = np.zeros((8, 8), bool)
    expected[4:6, 2:4] = True
    np.testing.assert_array_equal(changed, expected)


def test_pos_embed_layout():
    d, gh, gw = 16, 3, 5
    pe = get_2d_sincos_pos_embed(d, gh, gw)
    assert pe.shape == (gh * gw, d) and pe.dtype == np.float32
    tok = 1 * gw + 2  # row 1, column 2 (row-major tokens)
    # first half of the channels encodes the column, second half the row; omega_0 = 1
    np.testing.assert_allclose(pe[tok, [0, d // 4, d // 2, 3 * d // 4]],
                               [np.sin(2), np.cos(2), np.sin(1), np.cos(1)], rtol=1e-6)
    rows = pe.reshape(gh, gw, d)
    np.testing.assert_allclose(rows[0, :, : d // 2], rows[2, :, : d // 2])  # column part
    np.testing.assert_allclose(rows[:, 0, d // 2:], rows[:, 4, d // 2:])  # row part
    np.testing.assert_allclose(get_2d_sincos_pos_embed(d, 4), get_2d_sincos_pos_embed(d, 4, 4))


def test_variants_and_errors():
    assert set(DIT_VARIANTS) == {f"{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)}
    m = dit("B/4", num_classes=0)
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size, m.num_classes) == (768, 12, 12, 4, 0)
    m = dit("L/8")
    assert (m.hidden_size, m.depth, m.num_heads, m.patch_size) == (1024, 24, 16, 8)
    assert dit("s/2").hidden_size == 384 and dit("S/2").depth == 12 and dit("S/2").num_heads == 6
    with pytest.raises(ValueError, match="XL/2"):
        dit("M/2")
    x, t = inputs()
    with pytest.raises(ValueError, match="input_size"):
        shapes(DiT(**dict(TINY, input_size=16)), x, t)
    with pytest.raises(ValueError, match="num_classes=0"):
        shapes(DiT(**dict(TINY, num_classes=0)), x, t, Y)
    p = shapes(DiT(**dict(TINY, num_classes=0)), x, t)
    assert "y_embedder" not in p
