"""2-D toy distributions sampled in JAX with an explicit PRNG key.

All sets are roughly centred at the origin with coordinates within about [-3, 3]:

* ``"gmm8"``: equal-weight mixture of 8 isotropic Gaussians with std ``GMM8_STD = 0.1`` whose
  means sit on a circle of radius ``GMM8_RADIUS = 2`` at angles ``2 pi k / 8`` (k = 0..7).
  No rescaling: :func:`gmm8_params` returns exactly the mixture sampled here (per-coordinate
  variance ``2**2 / 2 + 0.1**2 = 2.01``).
* ``"checkerboard"``: uniform on the 8 "black" squares of a 4x4 board covering [-2, 2]^2
  (a square ``[i, i+1) x [j, j+1)`` is black when ``i + j`` is even).
* ``"two_moons"``: the two interleaved unit half circles of sklearn's ``make_moons``, shifted by
  (-0.5, -0.25) to be centred, plus isotropic Gaussian noise of std 0.05.
* ``"swiss_roll"``: ``t (cos t, sin t) / 5`` with ``t ~ U(1.5 pi, 4.5 pi)``, shifted by its exact
  mean ``-(2 / 5, 2 / (15 pi))`` to be centred, plus isotropic Gaussian noise of std 0.05.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.data.pipeline import ArraySource

__all__ = [
    "TOY2D_NAMES",
    "GMM8_RADIUS",
    "GMM8_STD",
    "gmm8_params",
    "sample_toy2d",
    "sample_toy2d_labeled",
    "Toy2DSource",
]

TOY2D_NAMES = ("gmm8", "checkerboard", "two_moons", "swiss_roll")
GMM8_RADIUS = 2.0
GMM8_STD = 0.1
_NOISE_STD = 0.05


def gmm8_params() -> tuple[np.ndarray, float, np.ndarray]:
    """``(means (8, 2) float32, std float, weights (8,) float32)`` of the ``"gmm8"`` mixture."""
    angles = 2.0 * np.pi * np.arange(8) / 8.0
    means = GMM8_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    weights = np.full((8,), 1.0 / 8.0)
    return means.astype(np.float32), float(GMM8_STD), weights.astype(np.float32)


def _check_name(name: str) -> None:
    if name not in TOY2D_NAMES:
        raise ValueError(f"unknown toy2d dataset {name!r}; valid names: {', '.join(TOY2D_NAMES)}")


def _gmm8(key, n):
    means, std, weights = gmm8_params()
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(jnp.asarray(weights)), shape=(n,))
    x = jnp.asarray(means)[comp] + std * jax.random.normal(k_noise, (n, 2))
    return x, comp.astype(jnp.int32)


def _checkerboard(key, n):
    k_cell, k_u = jax.random.split(key)
    # Black cells (i, j) with i + j even, i, j in {0..3}: pick one of 8 uniformly.
    cell = jax.random.randint(k_cell, (n,), 0, 8)
    i = cell // 2
    j = 2 * (cell % 2) + (i % 2)
    u = jax.random.uniform(k_u, (n, 2))
    x = jnp.stack([i, j], axis=-1).astype(jnp.float32) + u - 2.0
    return x


def _two_moons(key, n):
    k_side, k_t, k_noise = jax.random.split(key, 3)
    upper = jax.random.bernoulli(k_side, 0.5, (n,))
    t = jax.random.uniform(k_t, (n,), maxval=math.pi)
    x_up = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)
    x_low = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=-1)
    x = jnp.where(upper[:, None], x_up, x_low) - jnp.array([[0.5, 0.25]])
    return x + _NOISE_STD * jax.random.normal(k_noise, (n, 2))


def _swiss_roll(key, n):
    k_t, k_noise = jax.random.split(key)
    t = 1.5 * math.pi * (1.0 + 2.0 * jax.random.uniform(k_t, (n,)))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=-1) / 5.0
    # Exact centring: E[t cos t] = 2, E[t sin t] = 2 / (3 pi).
    x = x - jnp.array([[2.0 / 5.0, 2.0 / (15.0 * math.pi)]])
    return x + _NOISE_STD * jax.random.normal(k_noise, (n, 2))


def sample_toy2d_labeled(key: jax.Array, n: int, name: str) -> tuple[jax.Array, jax.Array]:
    """Like :func:`sample_toy2d` but also returns int32 labels (n,): the mixture component for
    ``"gmm8"``, zeros otherwise. The points equal ``sample_toy2d(key, n, name)``."""
    _check_name(name)
    return _sample_jit(key, int(n), name)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _sample_jit(key, n, name):
    if name == "gmm8":
        x, labels = _gmm8(key, n)
    else:
        fn = {"checkerboard": _checkerboard, "two_moons": _two_moons, "swiss_roll": _swiss_roll}
        x, labels = fn[name](key, n), jnp.zeros((n,), jnp.int32)
    return x.astype(jnp.float32), labels


def sample_toy2d(key: jax.Array, n: int, name: str) -> jax.Array:
    """``n`` float32 points (n, 2) from toy set ``name`` (one of :data:`TOY2D_NAMES`)."""
    return sample_toy2d_labeled(key, n, name)[0]


_SPLIT_FOLD = {"train": 0, "test": 1}


class Toy2DSource(ArraySource):
    """A fixed set of ``n`` points from toy set ``name``, generated once from ``seed``.

    ``split="test"`` draws an independent set (key folded with the split). Images are (n, 2)
    vectors (not rescaled; see the module docstring), labels are the gmm8 component (else 0).
    """

    def __init__(self, name: str, n: int = 65536, seed: int = 0, split: str = "train"):
        _check_name(name)
        if split not in _SPLIT_FOLD:
            raise ValueError(f"unknown toy2d split {split!r}; valid: {', '.join(_SPLIT_FOLD)}")
        key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), _SPLIT_FOLD[split])
        x, labels = sample_toy2d_labeled(key, int(n), name)
        super().__init__(np.asarray(x), np.asarray(labels))
        self.name = name
        self.split = split
