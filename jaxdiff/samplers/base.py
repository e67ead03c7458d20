"""Shared machinery of the samplers: the one signature, validation and the scanned loop.

Every sampler is a pure function

    sampler(denoise, x, grid, *, key=None, **options) -> x_end

* ``denoise(x, t) -> x0_hat`` -- the one model interface (:mod:`jaxdiff.parameterization`);
  ``t`` is the process time, a float32 scalar;
* ``x`` -- the state at ``grid.t[0]`` (for a pure-noise start ``grid.prior_sample(key, shape)``);
* ``grid`` -- a :class:`jaxdiff.schedules.Grid` of ``N + 1`` points: ``N`` steps;
* ``key`` -- PRNG key for stochastic samplers (ignored by deterministic ones).

The whole loop is one ``jax.lax.scan``, so ``jax.jit``, ``jax.vmap`` and ``jax.grad`` work
through it; the state keeps the dtype of ``x`` (float32 or bfloat16) while the grid
coefficients are float32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff.schedules import Grid


class Step(NamedTuple):
    """What one scanned step sees: the index, both end points of the step and a key."""

    i: jax.Array
    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    t_next: jax.Array
    alpha_next: jax.Array
    sigma_next: jax.Array
    key: jax.Array


def validate(name: str, x, grid: Grid, key, stochastic: bool) -> None:
    """Eager checks with messages that say what to pass instead."""
    if not isinstance(grid, Grid):
        raise TypeError(f"{name}: grid must be a jaxdiff.schedules.Grid, got {type(grid).__name__}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name}: x must be a floating array, got dtype {jnp.result_type(x)}")
    if grid.t.ndim != 1 or grid.t.shape[0] < 2:
        raise ValueError(f"{name}: grid needs at least 2 points (1 step), got t of shape {grid.t.shape}")
    if stochastic and key is None:
        raise ValueError(f"{name} is stochastic: pass key=jax.random.key(...)")


def run_steps(step_fn: Callable, carry, grid: Grid, key=None):
    """Scan ``carry = step_fn(carry, step)`` over the N steps of ``grid``; return the final carry."""
    n = grid.t.shape[0] - 1
    keys = jax.random.split(key if key is not None else jax.random.key(0), n)
    steps = Step(
        i=jnp.arange(n),
        t=grid.t[:-1], alpha=grid.alpha[:-1], sigma=grid.sigma[:-1],
        t_next=grid.t[1:], alpha_next=grid.alpha[1:], sigma_next=grid.sigma[1:],
        key=keys,
    )

    def body(c, s):
        return step_fn(c, s), None

    carry, _ = jax.lax.scan(body, carry, steps)
    return carry


def safe_div(a, b):
    """a / b with b == 0 replaced by 1 (for branches that jnp.where discards; keeps grads finite)."""
    return a / jnp.where(b == 0, 1.0, b)
