"""Tests of the DDPM/ADM UNet (jaxdiff.nets.unet).

XLA compilation dominates on CPU, so the tests share a few jitted functions (parameters are
arguments, never closed-over constants), use tiny models, and draw parameters with numpy from
the shapes given by ``jax.eval_shape(model.init, ...)`` -- which also moves the network away
from its zero-initialised output layers. Two tests run the real ``model.init``.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import UNet, count_params
from jaxdiff.nets.layers import group_norm_groups, normal_init, timestep_embedding, xavier_uniform
from jaxdiff.nets.unet import AttnBlock

# XLA compiles threefry bits slowly on CPU (per random draw site); the "unsafe_rbg" PRNG
# (XLA RngBitGenerator) compiles several times faster. The nets accept any key type; the MLP
# tests cover the default threefry keys.
KEY = jax.random.key(0, impl="unsafe_rbg")


def shapes(model, x, t, y=None):
    return jax.eval_shape(model.init, KEY, x, t, y)["params"]


def random_params(model, x, t, y=None, seed=0):
    """Parameters of the right shapes drawn with numpy (no random-kernel compilation)."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = str(path[-1].key)
        if name == "kernel":
            a = rng.normal(size=s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        elif name == "scale":
            a = 1.0 + 0.1 * rng.normal(size=s.shape)
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


# The shared model: 8x8x1 (sklearn digits), one level with attention, 10 classes. It is tiny
# because compile time grows quickly with depth; the two-level 8x8 model (attention at 4x4) of
# ``test_forward_two_levels`` gets its own compilation.
SMALL = dict(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.2,
             num_classes=10)
TWO_LEVELS = UNet(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_classes=10)
MODEL = UNet(**SMALL)
MODEL_BF16 = UNet(**SMALL, dtype=jnp.bfloat16)
X, T = inputs()
Y = jnp.array([3, 7], jnp.int32)


@functools.partial(jax.jit, static_argnames=("train", "bf16"))
def apply_small(params, x, t, y, key, train=False, bf16=False):
    model = MODEL_BF16 if bf16 else MODEL
    return model.apply({"params": params}, x, t, y, train=train, rngs={"dropout": key})


@pytest.fixture(scope="module")
def params():
    return random_params(MODEL, X, T, Y)


# ----------------------------------------------------------------------------------------------


def test_param_count_ddpm_cifar10():
    """Default fields = DDPM CIFAR-10 model: 35.7M params (reference code: 35,746,307)."""
    n = count_params(shapes(UNet(), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01
    assert n == 35_746_307


def test_structure_matches_ddpm():
    p = shapes(UNet(), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    assert p["temb"]["dense0"]["kernel"].shape == (128, 512)
    assert p["conv_in"]["kernel"].shape == (3, 3, 3, 128)
    # attention only at 16x16 (level 1): 2 per level on the way down, 3 on the way up, + middle
    assert {k for k in p if "attn" in k} == {
        "down_1_attn_0", "down_1_attn_1", "mid_attn_1",
        "up_1_attn_0", "up_1_attn_1", "up_1_attn_2",
    }
    assert "down_3_downsample" not in p and "down_2_downsample" in p
    assert "up_0_upsample" not in p and "up_1_upsample" in p
    assert p["up_0_block_0"]["nin_shortcut"]["kernel"].shape == (256 + 128, 128)
    assert p["conv_out"]["kernel"].shape == (3, 3, 128, 3)
    assert "label_emb" not in p


@pytest.mark.parametrize(
    "cfg, hw, c, out_channels",
    [
        (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,)), 8, 1, None),
        (dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(4,), out_channels=2),
         8, 1, 2),
        (dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,)), 32, 3, None),
        (dict(ch=16, ch_mult=(1, 2, 2), resblock_updown=True, head_dim=8), 32, 3, 6),
    ],
)
def test_output_shapes(cfg, hw, c, out_channels):
    model = UNet(**cfg, **({} if "out_channels" in cfg else {"out_channels": out_channels}))
    x, t = inputs(hw=hw, c=c)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, t), shapes(model, x, t))
    assert out.shape == (2, hw, hw, out_channels or c)
    assert out.dtype == jnp.float32


def test_real_init_output_is_zero():
    """Real init: conv_out is zero-initialised (DDPM init_scale=0), so the output is 0."""
    variables = jax.jit(MODEL.init)(KEY, X, T, Y)
    assert set(variables) == {"params"}
    p = variables["params"]
    assert count_params(p) == count_params(shapes(MODEL, X, T, Y))
    out = apply_small(p, X, T, Y, KEY)
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), 0.0)
    k = p["conv_in"]["kernel"]  # xavier uniform, fan_in 9, fan_out 144
    limit = math.sqrt(6 / (9 + 144))
    assert float(jnp.abs(k).max()) <= limit and float(jnp.std(k)) > 0.4 * limit
    assert not jnp.any(p["down_0_block_0"]["conv2"]["kernel"])
    assert not jnp.any(p["mid_attn_1"]["proj_out"]["kernel"])


def test_forward_two_levels():
    """Real forward through down/upsampling, attention at 4x4 and skip concatenation."""
    p = random_params(TWO_LEVELS, X, T, Y)
    assert "down_0_downsample" in p and "up_1_attn_0" in p and "down_0_attn_0" not in p
    f = jax.jit(lambda p, x, t: TWO_LEVELS.apply({"params": p}, x, t, Y))
    out = f(p, X, T)
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert float(jnp.abs(out).mean()) > 1e-3
    assert not np.allclose(out, f(p, X, T + 100.0), atol=1e-4)
    # examples are processed independently (no cross-batch mixing)
    out2 = f(p, X.at[1].set(0.0), T)
    np.testing.assert_allclose(out2[0], out[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out2[1], out[1], atol=1e-4)


def test_forward_depends_on_inputs(params):
    out = apply_small(params, X, T, Y, KEY)
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32
    assert float(jnp.abs(out).mean()) > 1e-3
    assert not np.allclose(out, apply_small(params, X, T + 100.0, Y, KEY), atol=1e-4)
    assert not np.allclose(out, apply_small(params, X + 1.0, T, Y, KEY), atol=1e-4)


def test_class_conditioning_and_null_class(params):
    assert params["label_emb"]["embedding_table"]["embedding"].shape == (11, 4 * 16)
    out = apply_small(params, X, T, Y, KEY)
    out_other = apply_small(params, X, T, jnp.array([5, 5], jnp.int32), KEY)
    assert not np.allclose(out, out_other, atol=1e-4)
    out_null = apply_small(params, X, T, jnp.full((2,), 10, jnp.int32), KEY)
    out_none = apply_small(params, X, T, None, KEY)  # y=None -> null class 10
    np.testing.assert_allclose(out_none, out_null, rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_none, out, atol=1e-4)


def test_labels_rejected_when_unconditional():
    model = UNet(ch=16, ch_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ValueError, match="num_classes=0"):
        shapes(model, X, T, jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="shape"):
        shapes(MODEL, X, T, jnp.zeros((3,), jnp.int32))


def test_dropout_train_vs_eval(params):
    k1, k2 = jax.random.split(jax.random.key(42, impl="unsafe_rbg"))
    eval1 = apply_small(params, X, T, Y, k1)
    eval2 = apply_small(params, X, T, Y, k2)
    np.testing.assert_array_equal(eval1, eval2)
    a = apply_small(params, X, T, Y, k1, train=True)
    b = apply_small(params, X, T, Y, k2, train=True)
    assert not np.allclose(a, b, atol=1e-4)
    np.testing.assert_array_equal(a, apply_small(params, X, T, Y, k1, train=True))
    assert not np.allclose(a, eval1, atol=1e-4)


def test_bfloat16_compute_close_to_float32(params):
    out32 = apply_small(params, X, T, Y, KEY)
    out16 = apply_small(params, X, T, Y, KEY, bf16=True)
    assert out16.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
    assert 0.0 < rel < 0.05, rel  # > 0: bf16 really was used


def test_bf16_params_stay_float32_by_default():
    p = shapes(MODEL_BF16, X, T)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(p)} == {jnp.dtype(jnp.float32)}
    p = shapes(UNet(**SMALL, param_dtype=jnp.bfloat16), X, T)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(p)} == {jnp.dtype(jnp.bfloat16)}


def test_resblock_updown_structure():
    x, t = inputs(hw=16, c=3)
    base = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8, 4))
    p_plain = shapes(UNet(**base), x, t)
    p_rb = shapes(UNet(**base, resblock_updown=True), x, t)
    assert set(p_plain["down_0_downsample"]) == {"kernel", "bias"}
    assert "conv1" in p_rb["down_0_downsample"] and "conv1" in p_rb["up_2_upsample"]
    assert count_params(p_rb) > count_params(p_plain)


@pytest.mark.parametrize("heads, head_dim", [(1, None), (1, 4)])
def test_attention_block_matches_numpy(heads, head_dim):
    """AttnBlock == x + proj(softmax(q k^T / sqrt(d)) v) over all pixels, per head."""
    c = 16
    block = AttnBlock(num_heads=heads, head_dim=head_dim, norm_groups=4)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, c)), jnp.float32)
    rng = np.random.default_rng(3)
    p = jax.tree_util.tree_map_with_path(
        lambda path, l: jnp.asarray(
            (str(path[-1].key) == "scale")
            + rng.normal(size=l.shape) * (0.5 if l.ndim == 2 else 0.1),
            jnp.float32,
        ),
        jax.eval_shape(block.init, KEY, x)["params"],
    )
    out = np.asarray(block.apply({"params": p}, x))

    n_heads = c // head_dim if head_dim else heads
    xn = np.asarray(x, np.float64).reshape(2, 4, 4, 4, c // 4)  # GroupNorm with 4 groups
    mu, var = xn.mean(axis=(1, 2, 4), keepdims=True), xn.var(axis=(1, 2, 4), keepdims=True)
    h = ((xn - mu) / np.sqrt(var + 1e-6)).reshape(2, 16, c)
    h = h * np.asarray(p["norm"]["norm"]["scale"]) + np.asarray(p["norm"]["norm"]["bias"])
    lin = lambda a, name: a @ np.asarray(p[name]["kernel"]) + np.asarray(p[name]["bias"])  # noqa
    split = lambda a: a.reshape(2, 16, n_heads, c // n_heads)  # noqa: E731
    q, k, v = split(lin(h, "q")), split(lin(h, "k")), split(lin(h, "v"))
    w = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c // n_heads)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(2, 16, c)
    ref = np.asarray(x) + lin(a, "proj_out").reshape(2, 4, 4, c)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_bad_spatial_size_raises():
    with pytest.raises(ValueError, match="divisible"):
        shapes(UNet(ch=32, ch_mult=(1, 2, 2, 2)), jnp.zeros((1, 12, 12, 1)), jnp.zeros((1,)))


def test_group_norm_groups():
    assert group_norm_groups(128) == 32 and group_norm_groups(256) == 32
    assert group_norm_groups(16) == 4
    assert group_norm_groups(32) == 8
    assert group_norm_groups(48) == 12
    assert group_norm_groups(3) == 1
    assert group_norm_groups(16, max_groups=2) == 2
    model = UNet(ch=16, ch_mult=(1,), attn_resolutions=())
    p = shapes(model, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))
    assert p["norm_out"]["norm"]["scale"].shape == (16,)


def test_timestep_embedding_conventions():
    t = jnp.array([0.0, 1.0, 999.0])
    e = timestep_embedding(t, 8)  # ADM/DiT: [cos, sin], freqs exp(-ln(1e4) i / half)
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(e[:, :4], np.cos(np.asarray(t)[:, None] * freqs), atol=1e-4)
    np.testing.assert_allclose(e[:, 4:], np.sin(np.asarray(t)[:, None] * freqs), atol=1e-4)
    d = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1.0)  # DDPM TF convention
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(d[:, :4], np.sin(np.asarray(t)[:, None] * freqs), atol=1e-4)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_initialisers_statistics():
    w = xavier_uniform(KEY, (3, 3, 64, 96))  # fan_in 576, fan_out 864
    limit = math.sqrt(6 / (576 + 864))
    assert w.shape == (3, 3, 64, 96)
    assert float(jnp.abs(w).max()) <= limit
    assert abs(float(jnp.std(w)) - limit / math.sqrt(3)) < 0.02 * limit
    e = normal_init(0.02)(KEY, (1001, 64))
    assert e.shape == (1001, 64) and abs(float(jnp.std(e)) - 0.02) < 0.001


def test_out_of_range_labels_are_rejected_when_concrete():
    """An embedding lookup past the table gives NaN and -1 the null row: concrete labels are
    checked (under jit they are tracers, and the check is left out)."""
    from jaxdiff.nets.layers import resolve_labels

    assert resolve_labels(jnp.array([0, 10]), 10, 2).tolist() == [0, 10]  # 10 = the null class
    for bad in ([-1, 3], [0, 11], [100, 2]):
        with pytest.raises(ValueError, match=r"labels y must be in \[0, 10\]"):
            resolve_labels(jnp.array(bad), 10, 2)
    traced = jax.jit(lambda y: resolve_labels(y, 10, 2))(jnp.array([0, 11]))  # not checked there
    assert traced.shape == (2,)
