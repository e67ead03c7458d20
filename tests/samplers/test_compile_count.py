"""Compilation behaviour of the jitted sampling loop.

The step count sets the scan length (a static shape): each distinct value compiles once and is
then reused; a guidance scale passed as a traced argument, and new grid values of the same length,
never recompile. Counted two ways: the jitted function's own executable cache
(``jax.jit(...)._cache_size()``) and JAX's backend-compile events (``jax.monitoring``,
``/jax/core/compile/backend_compile_duration``), so the test does not lean on one private hook.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32))


def model_fn(x, t, w):
    """A toy eps-model with a classifier-free-guidance-like scale w (traced)."""
    cond = jnp.tanh(0.5 * x + 1e-3 * t[:, None])
    uncond = 0.5 * jnp.tanh(x)
    return uncond + w * (cond - uncond)


@contextlib.contextmanager
def count_compiles():
    """Yields a list that collects one entry per XLA backend compilation inside the block."""
    events = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("name", ["euler", "dpmpp_2m"])
def test_step_count_recompiles_once_per_value_guidance_never(name):
    f = jax.jit(lambda x, w, num_steps: samplers.sample(name, lambda x, t: model_fn(x, t, w), x, "linear", num_steps),
                static_argnames="num_steps")
    with count_compiles() as events:
        outs = {}
        for n in (3, 4, 3, 5, 4):
            outs[n] = f(X, jnp.float32(2.0), num_steps=n)
        assert f._cache_size() == 3  # one executable per distinct step count
        n_step_compiles = len(events)
        assert n_step_compiles >= 3
        # guidance scale: traced -> the same executable, different results. (Keep its type fixed:
        # a Python float is weakly typed, so switching between 2.0 and jnp.float32(2.0) is a new
        # signature and compiles once more.)
        res = [np.asarray(f(X, jnp.float32(w), num_steps=4)) for w in (1.0, 3.0, 7.5, 0.5)]
        assert f._cache_size() == 3 and len(events) == n_step_compiles
        assert np.abs(res[0] - res[2]).max() > 1e-3
    # and the step count changed the result
    assert np.abs(np.asarray(outs[3]) - np.asarray(outs[5])).max() > 1e-4


def test_grid_as_argument_recompiles_only_on_length():
    """A Grid passed as a jit argument: new times of the same length reuse the executable."""
    proc = P.VPLinear()
    f = jax.jit(lambda x, grid, w: samplers.get("heun")(lambda x, t: x - model_fn(x, jnp.broadcast_to(t, (2,)), w)
                                                        * 0.1, x, grid))
    with count_compiles() as events:
        f(X, S.make_grid(proc, 4), 1.0)
        f(X, S.grid_from_times(proc, np.linspace(0.9, 0.01, 4)), 2.0)  # same length, other values
        assert len(events) >= 1
        assert f._cache_size() == 1
        before = len(events)
        f(X, S.make_grid(proc, 6), 1.0)
        assert f._cache_size() == 2 and len(events) > before
