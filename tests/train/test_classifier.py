"""The noise-aware classifier (nets.classifier + train.classifier) and classifier guidance with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance, samplers
from jaxdiff import processes as P
from jaxdiff.data.digits import load_digits
from jaxdiff.nets.classifier import NoisyClassifier
from jaxdiff.schedules import make_grid
from jaxdiff.train.classifier import classifier_log_prob, noisy_accuracy, train_noisy_classifier

PROC = P.VPLinear(beta_min=0.1, beta_max=20.0, t_min=1e-3, t_max=1.0)
K, C = 4, 0.3
MEANS = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]], jnp.float32)


def _mixture(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    return (np.asarray(MEANS)[y] + C * rng.standard_normal((n, 2))).astype(np.float32), y.astype(np.int32)


def _uncond_denoise(x, t):
    b = x.shape[0]
    a = jnp.broadcast_to(PROC.alpha(t), (b,))[:, None, None]
    s = jnp.broadcast_to(PROC.sigma(t), (b,))[:, None, None]
    v = a**2 * C**2 + s**2
    diff = x[:, None] - a * MEANS[None]
    w = jax.nn.softmax(-0.5 * jnp.sum(diff**2, -1) / v[..., 0], axis=1)
    return jnp.sum(w[..., None] * (MEANS[None] + (a * C**2 / v) * diff), axis=1)


def test_trained_noisy_classifier_guides_mixture_samples_to_requested_class():
    data, labels = _mixture(4096, 0)
    model = NoisyClassifier(num_classes=K, ch=32)
    params, losses = train_noisy_classifier(model, PROC, data, labels, num_steps=300, batch_size=256,
                                            lr=3e-3, key=jax.random.key(0), progress=False)
    # uniform t: at high noise the class is unknowable, so the loss stays well above 0 (chance: log 4)
    assert losses[-20:].mean() < 0.75 * np.log(K), losses[-20:].mean()
    test, test_y = _mixture(1024, 1)
    acc_clean = noisy_accuracy(model, params, PROC, test, test_y, 0.01, jax.random.key(1))
    acc_noisy = noisy_accuracy(model, params, PROC, test, test_y, 0.9, jax.random.key(1))
    assert acc_clean > 0.95, acc_clean
    assert acc_noisy < acc_clean  # at t = 0.9 the class is mostly destroyed
    grid = make_grid(PROC, 25, "logsnr")
    x = grid.prior_sample(jax.random.key(2), (1024, 2))
    y = jnp.arange(1024) % K
    d = guidance.classifier_guidance(_uncond_denoise, classifier_log_prob(model, params, PROC, y), PROC, 2.0)
    out = samplers.get("heun")(d, x, grid)
    near = np.asarray(jnp.argmin(jnp.sum((out[:, None] - MEANS[None]) ** 2, -1), axis=1))
    base = np.asarray(jnp.argmin(jnp.sum((samplers.get("heun")(_uncond_denoise, x, grid)[:, None] - MEANS[None]) ** 2, -1), 1))
    frac, frac0 = float(np.mean(near == np.asarray(y))), float(np.mean(base == np.asarray(y)))
    assert frac > 0.9 and frac0 < 0.4, (frac, frac0)


@pytest.mark.slow  # ~30 s on CI's CPU; test_trained_noisy_classifier_guides_... covers the classifier path
def test_noisy_classifier_on_digit_images():
    images, labels = load_digits("train")
    model = NoisyClassifier(num_classes=10, ch=16, ch_mult=(1, 2))
    proc = P.discrete_vp(beta_schedule="linear")
    params, losses = train_noisy_classifier(model, proc, images, labels, num_steps=40, batch_size=64,
                                            lr=3e-3, key=jax.random.key(0), progress=False)
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < losses[:10].mean()
    lp = classifier_log_prob(model, params, proc, jnp.asarray(labels[:8]))(jnp.asarray(images[:8]), 10.0)
    assert lp.shape == (8,) and bool(jnp.all(lp <= 0))
    g = jax.grad(lambda x: jnp.sum(classifier_log_prob(model, params, proc, jnp.asarray(labels[:8]))(x, 500.0)))(
        jnp.asarray(images[:8]))
    assert g.shape == (8, 8, 8, 1) and bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
