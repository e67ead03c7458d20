"""Multistep consistency sampling (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models",
ICML 2023, Algorithm 1).

A consistency model f(x_t, t) maps any point of a probability-flow ODE trajectory to its origin,
the clean sample; in jaxdiff's one interface it is the denoiser, ``denoise(x, t) -> x0_hat``.
Algorithm 1 evaluates f at the first time, then alternately re-noises the result to the next time
with fresh noise and evaluates f again:

    x0 = f(x, t_0);   for i = 1 .. N - 1:   x_i = alpha_i x0 + sigma_i z_i,   x0 = f(x_i, t_i).

Here that is one step per grid interval, ``x' = alpha' f(x, t) + sigma' z``; on a grid ending at
the clean point (sigma = 0, alpha = 1; every ``make_grid`` grid) the last step returns f's output,
Algorithm 1's sample, so N steps cost N model calls. (The paper re-noises with
sqrt(tau^2 - eps^2) z because its f is anchored at sigma = eps = 0.002 rather than 0: its
re-noised variance is smaller by eps^2 = 4e-6.) The re-noising is the forward marginal, so it is
written in (alpha, sigma) for any process, finite at alpha = 0.

Noise: z_i from the step keys (``jax.random.split(key, N)``). A one-step grid (2 points) needs no
key; without one its single re-noise uses z = 0 (which is exact at a clean end point).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, validate

__all__ = ["consistency_multistep"]


def consistency_multistep(denoise, x, grid, *, key=None, s_noise: float = 1.0):
    """Consistency-model sampling, Algorithm 1 of Song et al. 2023 (see the module docstring).

    Args:
      denoise: the consistency function f(x, t) -> clean sample (the denoiser interface).
      x, grid, key: the shared sampler signature; ``key`` is required when the grid has more than
        one step.
      s_noise: scale of the re-noising (1 = Algorithm 1).
    """
    one_step = grid.t.shape[0] == 2 if hasattr(grid, "t") else False
    validate("consistency_multistep", x, grid, key, stochastic=not one_step)
    dtype = x.dtype
    use_noise = key is not None

    def step(x, s):
        x0 = denoise(x, s.t).astype(jnp.float32)
        x_next = s.alpha_next * x0
        if use_noise:
            z = jax.random.normal(s.key, x.shape, jnp.float32)
            x_next = x_next + (s_noise * s.sigma_next) * z
        return x_next.astype(dtype)

    return run_steps(step, x, grid, key)


consistency_multistep.order = 1
consistency_multistep.stochastic = True
