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


def validate(name: str, x, grid: Grid, key, stochastic: bool, min_steps: int = 1) -> None:
    """Eager checks (shapes and dtypes only: no device sync, works on tracers) with messages
    that say what to pass instead."""
    if not isinstance(grid, Grid):
        raise TypeError(f"{name}: grid must be a jaxdiff.schedules.Grid (schedules.make_grid(...)), "
                        f"got {type(grid).__name__}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: x must be a jax or numpy array, got {type(x).__name__}; wrap it in jnp.asarray")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: x must be a floating array (float32 or bfloat16), got dtype {x.dtype}; "
                        "cast it with x.astype(jnp.float32)")
    for field in ("t", "alpha", "sigma"):
        a = getattr(grid, field)
        if not hasattr(a, "shape") or a.ndim != 1 or a.shape != grid.t.shape:
            raise ValueError(f"{name}: grid.{field} must be 1-D with the shape of grid.t {getattr(grid.t, 'shape', None)}, "
                             f"got {getattr(a, 'shape', type(a).__name__)}; build grids with schedules.make_grid")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise TypeError(f"{name}: grid.{field} must be floating, got dtype {a.dtype}")
        # float64 that stays float64 (jax_enable_x64 on; numpy float64 is cast to float32 otherwise):
        # the samplers' scan carries are float32, so say so instead of failing inside lax.scan
        if jax.dtypes.canonicalize_dtype(a.dtype) == jnp.float64:
            raise TypeError(f"{name}: grid.{field} is float64; the samplers run in float32 (as "
                            "schedules.make_grid builds grids): cast the grid's fields with .astype(jnp.float32)")
    if grid.t.shape[0] < min_steps + 1:
        raise ValueError(f"{name}: the grid needs at least {min_steps + 1} points ({min_steps} step(s)), got "
                         f"t of shape {grid.t.shape}; pass num_steps >= {min_steps} to schedules.make_grid")
    if stochastic and key is None:
        raise ValueError(f"{name} is stochastic: pass key=jax.random.key(...)")
    if key is not None:
        typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key) if hasattr(key, "dtype") else False
        raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and key.ndim == 1  # PRNGKey(seed)
        if not (typed and key.shape == ()) and not raw:
            raise TypeError(f"{name}: key must be one PRNG key (jax.random.key(seed)), got "
                            f"{getattr(key, 'dtype', type(key).__name__)} of shape {getattr(key, 'shape', None)}")


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
