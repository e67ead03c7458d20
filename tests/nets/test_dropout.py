"""jaxdiff.nets.dropout: the unrolled threefry against jax's own, the mask's rate and layout,
the exact expectation, the module's flax interface. (Sharding invariance of the mask is checked
end to end by tests/train/test_sharding.py, which trains with dropout 0.1 on 1 and 8 devices.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend.random import threefry2x32_p

from jaxdiff.nets.dropout import DROPOUT_LEVELS, Dropout, dropout, dropout_keep_mask, threefry2x32


def _words(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32))


def test_threefry_is_bit_identical_to_jax_primitive():
    k1, k2 = _words(0, (2,))
    x1, x2 = _words(1, (4096,)), _words(2, (4096,))
    ours = jax.jit(threefry2x32)(k1, k2, x1, x2)
    ref = threefry2x32_p.bind(k1, k2, x1, x2)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_threefry_known_answer():
    # Random123's known-answer vector for threefry2x32_20 (key = counter = 0), which jax's
    # tests also use: 0x6b200159, 0x99ba4efe.
    y = threefry2x32(np.uint32(0), np.uint32(0), jnp.zeros((1,), jnp.uint32), jnp.zeros((1,), jnp.uint32))
    assert [int(y[0][0]), int(y[1][0])] == [0x6B200159, 0x99BA4EFE]


def test_counter_layout_is_jax_random_bits_layout():
    """Counter (hi=0, lo=row-major position) is the layout of jax's partitionable threefry:
    XOR of the two words reproduces ``jax.random.bits`` for the counter shape."""
    key = jax.random.key(7)
    shape = (3, 5, 7)
    k1, k2 = jax.random.key_data(key)
    pos = jnp.arange(np.prod(shape), dtype=jnp.uint32).reshape(shape)
    y1, y2 = threefry2x32(k1, k2, jnp.zeros_like(pos), pos)
    np.testing.assert_array_equal(np.asarray(y1 ^ y2), np.asarray(jax.random.bits(key, shape, jnp.uint32)))


def test_mask_uses_four_16_bit_slices_per_counter():
    """Element (..., c) is slice c // m of counter (..., c % m), m = ceil(C / 4)."""
    key = jax.random.key(3)
    shape, rate = (2, 6), 0.3
    m = 2
    k1, k2 = jax.random.key_data(key)
    pos = jnp.arange(2 * m, dtype=jnp.uint32).reshape(2, m)
    y1, y2 = (np.asarray(w) for w in threefry2x32(k1, k2, jnp.zeros_like(pos), pos))
    slices = np.stack([y1 & 0xFFFF, y1 >> 16, y2 & 0xFFFF, y2 >> 16], axis=1)  # (2, 4, m)
    expected = slices.reshape(2, 4 * m)[:, :6] >= round(rate * DROPOUT_LEVELS)
    np.testing.assert_array_equal(np.asarray(dropout_keep_mask(key, shape, rate)), expected)


@pytest.mark.parametrize("channels", [1, 3, 5, 64])
@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_fraction_matches_quantised_rate(channels, rate):
    n = 40_000 * 64 // channels
    keep = np.asarray(jax.jit(lambda k: dropout_keep_mask(k, (n, channels), rate))(jax.random.key(11)))
    p = round(rate * DROPOUT_LEVELS) / DROPOUT_LEVELS
    sd = np.sqrt(p * (1 - p) / keep.size)
    assert abs((1 - keep.mean()) - p) < 5 * sd
    # Every channel position (hence each of the four 16-bit slices) drops at the same rate.
    per_channel = 1 - keep.mean(axis=0)
    assert np.all(np.abs(per_channel - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_neighbouring_elements_are_uncorrelated():
    keep = np.asarray(dropout_keep_mask(jax.random.key(5), (4096, 64), 0.5)).astype(np.float64)
    flat = keep.reshape(-1) - keep.mean()
    for lag in (1, 16, 64):  # next element, next 16-bit-slice block (m = 16), next row
        corr = np.mean(flat[:-lag] * flat[lag:]) / flat.var()
        assert abs(corr) < 5 / np.sqrt(flat.size), lag


def test_survivors_scaled_so_expectation_is_exact():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 8, 8, 16)), jnp.float32)
    y = np.asarray(dropout(jax.random.key(1), x, 0.1))
    t = round(0.1 * DROPOUT_LEVELS)
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] * DROPOUT_LEVELS / (DROPOUT_LEVELS - t), rtol=1e-6)
    # Mean over keys of dropout(x) is x: the average over 400 masks is within 5 standard errors.
    keys = jax.random.split(jax.random.key(2), 400)
    ones = jnp.ones((256,))
    mean = np.asarray(jax.vmap(lambda k: dropout(k, ones, 0.1))(keys)).mean(axis=0)
    se = np.sqrt(t / (DROPOUT_LEVELS - t) / 400)
    assert np.all(np.abs(mean - 1.0) < 5 * se) and abs(mean.mean() - 1.0) < 5 * se / 16


def test_bfloat16_survivors_scaled_in_float32():
    """The scale is applied in float32 and the product rounded once to bf16: over 2**18
    survivors of random bf16 values the mean relative error against x / keep is ~0 (< 1e-4);
    a bf16 scale (1.109375 for 1.1111) would make it -1.6e-3."""
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (512, 512)), jnp.bfloat16)
    y = dropout(jax.random.key(6), x, 0.1)
    assert y.dtype == jnp.bfloat16
    t = round(0.1 * DROPOUT_LEVELS)
    xf, yf = np.asarray(x, np.float64), np.asarray(y, np.float64)
    kept = yf != 0
    exact = xf[kept] * DROPOUT_LEVELS / (DROPOUT_LEVELS - t)
    assert abs(np.mean(yf[kept] / exact - 1.0)) < 1e-4


def test_broadcast_dims_share_the_mask():
    x = jnp.ones((4, 8, 8, 16))
    y = np.asarray(dropout(jax.random.key(8), x, 0.5, broadcast_dims=(1, 2)))
    assert np.all(y == y[:, :1, :1, :])  # one mask per (example, channel)
    assert 0 < (y[:, 0, 0, :] == 0).mean() < 1
    np.testing.assert_array_equal(
        np.asarray(Dropout(0.5, broadcast_dims=(1, 2)).apply({}, x, deterministic=False, rng=jax.random.key(8))), y)


def test_gradient_is_the_scaled_mask():
    x = jnp.ones((4, 32))
    key = jax.random.key(9)
    g = jax.grad(lambda v: jnp.sum(dropout(key, v, 0.25)))(x)
    keep = np.asarray(dropout_keep_mask(key, x.shape, 0.25))
    np.testing.assert_allclose(np.asarray(g), keep * (DROPOUT_LEVELS / (DROPOUT_LEVELS - 16384)))


def test_edge_rates_shapes_dtypes_and_key_types():
    x = jnp.arange(1.0, 7.0).reshape(2, 3)
    key = jax.random.key(0)
    assert dropout(key, x, 0.0) is x
    assert dropout(key, x, 1e-6) is x  # rounds to 0 / 2**16
    np.testing.assert_array_equal(np.asarray(dropout(key, x, 1.0)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\], got -0.1"):
        dropout(key, x, -0.1)
    assert dropout(key, jnp.float32(2.0), 0.5).shape == ()
    assert dropout(key, x.astype(jnp.bfloat16), 0.5).dtype == jnp.bfloat16
    raw = jax.random.PRNGKey(0)  # raw uint32[2] of the default implementation: same words
    np.testing.assert_array_equal(np.asarray(dropout(raw, x, 0.5)), np.asarray(dropout(key, x, 0.5)))
    with pytest.raises(ValueError, match=r"one PRNG key, got a batch of keys of shape \(2,\)"):
        dropout(jax.random.split(key), x, 0.5)
    rbg = jax.random.key(0, impl="unsafe_rbg")
    keep = np.asarray(dropout_keep_mask(rbg, (20_000,), 0.5))
    assert abs(keep.mean() - 0.5) < 5 * 0.5 / np.sqrt(keep.size)


def test_module_follows_flax_dropout_interface():
    x = jnp.ones((8, 16))
    key = jax.random.key(4)
    m = Dropout(0.5)
    assert m.apply({}, x, deterministic=True) is x
    y = m.apply({}, x, deterministic=False, rngs={"dropout": key})
    # The key is the one flax's make_rng gives the module: the same as nn.Dropout would get.
    class Probe(nn.Module):
        @nn.compact
        def __call__(self):
            return self.make_rng("dropout")

    k = Probe().apply({}, rngs={"dropout": key})
    np.testing.assert_array_equal(np.asarray(y), np.asarray(dropout(k, x, 0.5)))
    np.testing.assert_array_equal(np.asarray(Dropout(0.5, deterministic=False).apply({}, x, rng=key)),
                                  np.asarray(dropout(key, x, 0.5)))
    assert Dropout(0.0).apply({}, x, deterministic=False) is x
