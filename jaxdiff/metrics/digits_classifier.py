"""A small CNN on scikit-learn's 8x8 digits: the feature extractor of the embedded default.

Inception features mean nothing on 8x8 grey digits, so the default model is scored the way FID
scores ImageNet-like images, with a network trained on the data itself: the Frechet distance
(Heusel et al. 2017) between the classifier's penultimate features of generated and of
real digits ("digits FD"), and the accuracy with which it recognises the class a
class-conditional sample was asked for.

The weights (``assets/digits_classifier.npz``, 164 KB, float32, no pickle) are trained by
``experiments/digits_classifier/train.py`` with :func:`train_classifier` on the ``train`` split
of :func:`jaxdiff.data.digits.load_digits` (the split the diffusion models train on; the
``test`` split stays held out) and are committed (training: 2,000 steps, ~4.5 min of CPU time).

Network: conv3x3(16) -> ReLU -> conv3x3(32) -> ReLU -> avgpool 2 -> conv3x3(64) -> ReLU ->
avgpool 2 -> flatten (256) -> dense(64) -> ReLU = features -> dense(10) = logits. Training
augments with random shifts of up to one pixel.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

__all__ = ["DigitsClassifier", "train_classifier", "save_params", "load_params", "DEFAULT_WEIGHTS",
           "features_and_logits", "digits_frechet_distance", "class_accuracy", "FEATURE_DIM"]

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "digits_classifier.npz")
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """``(N, 8, 8, 1)`` images in [-1, 1] -> ``{"features": (N, 64), "logits": (N, 10)}``."""

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        x = nn.relu(nn.Conv(16, (3, 3), padding="SAME", name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), padding="SAME", name="conv2")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(64, (3, 3), padding="SAME", name="conv3")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        feats = nn.relu(nn.Dense(FEATURE_DIM, name="fc1")(x))
        return {"features": feats, "logits": nn.Dense(10, name="fc2")(feats)}


def _shift(key, x):
    """Random translation by -1, 0 or +1 pixels in each direction (zero = background -1 padding)."""
    n = x.shape[0]
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offs = jax.random.randint(key, (n, 2), 0, 3)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (8, 8, 1)))(pad, offs)


def train_classifier(images, labels, *, seed: int = 0, steps: int = 2000, batch_size: int = 128,
                     lr: float = 2e-3, augment: bool = True):
    """Adam with cosine decay on cross-entropy; returns the params. Deterministic given ``seed``."""
    import optax

    model = DigitsClassifier()
    images = jnp.asarray(images, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    key = jax.random.PRNGKey(seed)
    params = model.init(key, images[:1])["params"]
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    opt_state = tx.init(params)
    n = images.shape[0]

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(carry, i):
        p, s = carry
        k = jax.random.fold_in(key, i)
        k_idx, k_aug = jax.random.split(k)
        idx = jax.random.randint(k_idx, (batch_size,), 0, n)
        x, y = images[idx], labels[idx]
        if augment:
            x = _shift(k_aug, x)
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    (params, _), losses = jax.lax.scan(step, (params, opt_state), jnp.arange(steps))
    return params


def save_params(params, path: str) -> str:
    """Flat float32 ``.npz`` (``conv1/kernel``, ...); no pickle."""
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **flat)
    return path


@functools.lru_cache(maxsize=4)
def _load_cached(path: str):
    with np.load(path, allow_pickle=False) as z:
        return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(z[k]) for k in z.files})


def load_params(path: str | None = None):
    """The classifier's params (default: the committed ``assets/digits_classifier.npz``)."""
    path = os.path.abspath(path or DEFAULT_WEIGHTS)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits classifier weights {path!r} not found; train them with "
                                "`python experiments/digits_classifier/train.py`")
    return _load_cached(path)


@jax.jit
def _apply(params, x):
    return DigitsClassifier().apply({"params": params}, x)


def features_and_logits(images, params=None, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features (N, 64) and logits (N, 10) of images (N, 8, 8, 1) in [-1, 1]."""
    params = load_params() if params is None else params
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1):
        raise ValueError(f"the digits classifier takes (N, 8, 8, 1) images, got shape {x.shape}")
    feats, logits = [], []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size]
        nb = xb.shape[0]
        if nb < batch_size and x.shape[0] > batch_size:  # one compiled shape for every batch
            xb = np.concatenate([xb, np.zeros((batch_size - nb,) + xb.shape[1:], np.float32)])
        out = _apply(params, jnp.asarray(xb))
        feats.append(np.asarray(out["features"])[:nb])
        logits.append(np.asarray(out["logits"])[:nb])
    return np.concatenate(feats), np.concatenate(logits)


def digits_frechet_distance(images, reference_images, params=None) -> float:
    """Frechet distance between the classifier features of ``images`` and ``reference_images``."""
    from jaxdiff.metrics.fid import feature_statistics, frechet_distance

    fa, _ = features_and_logits(images, params)
    fb, _ = features_and_logits(reference_images, params)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))


def class_accuracy(images, labels, params=None) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels``."""
    _, logits = features_and_logits(images, params)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
