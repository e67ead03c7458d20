"""Shared test configuration for every test directory.

Strict numerics, as diffrax's test-suite does: implicit rank promotion (e.g. ``(B,) * (B, C, H, W)``)
raises instead of silently broadcasting, so shape bugs in the library surface as errors.
"""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    """A fresh PRNG key (new-style typed key)."""
    return jax.random.key(0)
