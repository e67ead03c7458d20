"""Tests for jaxdiff.data.toy2d."""

import jax
import numpy as np
import pytest

from jaxdiff.data import TOY2D_NAMES, Toy2DSource, gmm8_params, sample_toy2d, sample_toy2d_labeled


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_shapes_determinism_and_key_dependence(name):
    key = jax.random.PRNGKey(0)
    x = np.asarray(sample_toy2d(key, 1000, name))
    assert x.shape == (1000, 2) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, np.asarray(sample_toy2d(key, 1000, name)))
    y = np.asarray(sample_toy2d(jax.random.PRNGKey(1), 1000, name))
    assert not np.allclose(x, y)
    assert np.all(np.abs(x) < 4.0)
    assert np.all(np.abs(x.mean(0)) < 0.3)  # roughly centred


def test_gmm8_params():
    means, std, weights = gmm8_params()
    assert means.shape == (8, 2) and weights.shape == (8,)
    np.testing.assert_allclose(np.linalg.norm(means, axis=1), 2.0, rtol=1e-6)
    assert std == pytest.approx(0.1)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)


def test_gmm8_moments_match_params():
    n = 200_000
    x, comp = sample_toy2d_labeled(jax.random.PRNGKey(42), n, "gmm8")
    x, comp = np.asarray(x, np.float64), np.asarray(comp)
    means, std, weights = gmm8_params()
    means = means.astype(np.float64)
    mu = weights @ means
    cov = (weights[:, None, None] * (std**2 * np.eye(2) + means[:, :, None] * means[:, None, :])
           ).sum(0) - np.outer(mu, mu)
    # Monte-Carlo s.e.: mean ~ sqrt(2/n) = 0.003; cov entries ~ 0.005.
    np.testing.assert_allclose(x.mean(0), mu, atol=0.02)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.04)
    # Labels are the sampling component: nearest mean, within a few stds, uniform frequencies.
    dist = np.linalg.norm(x[:, None, :] - means[None], axis=-1)
    assert np.mean(dist.argmin(1) == comp) > 0.999
    assert np.all(np.linalg.norm(x - means[comp], axis=1) < 8 * std)
    np.testing.assert_allclose(np.bincount(comp, minlength=8) / n, weights, atol=0.005)
    # Within-component std.
    np.testing.assert_allclose((x - means[comp]).std(0), std, rtol=0.02)


def test_checkerboard_support():
    x = np.asarray(sample_toy2d(jax.random.PRNGKey(3), 20_000, "checkerboard"))
    assert np.all(x >= -2.0) and np.all(x <= 2.0)
    cells = np.floor(x).astype(int) + 2
    assert np.all((cells.sum(1) % 2) == 0)  # only the "black" squares
    counts = np.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    assert np.count_nonzero(counts) == 8


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="gmm8.*checkerboard.*two_moons.*swiss_roll"):
        sample_toy2d(jax.random.PRNGKey(0), 10, "spirals")
    with pytest.raises(ValueError, match="gmm8"):
        Toy2DSource("spirals", n=10)


def test_toy2d_source():
    src = Toy2DSource("gmm8", n=4096, seed=0)
    assert len(src) == 4096
    batch = src[np.arange(10)]
    assert batch["image"].shape == (10, 2) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    assert set(np.unique(src.labels)) == set(range(8))
    np.testing.assert_array_equal(src.images, Toy2DSource("gmm8", n=4096, seed=0).images)
    assert not np.allclose(src.images, Toy2DSource("gmm8", n=4096, seed=1).images)
    assert not np.allclose(src.images, Toy2DSource("gmm8", n=4096, seed=0, split="test").images)
    moons = Toy2DSource("two_moons", n=256)
    np.testing.assert_array_equal(moons.labels, 0)
