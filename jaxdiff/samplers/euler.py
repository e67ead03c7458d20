"""Euler and Heun on the probability-flow ODE in the variance-exploding frame.

With x~ = x / alpha and s = sigma / alpha the PF-ODE is dx~/ds = (x~ - D(x~, s)) / s
(Karras et al. 2022, Eq. 4 with the scaling removed). Both samplers take EDM's stochastic
"churn" (Algorithm 2, lines 4-6): S_churn, S_tmin, S_tmax, S_noise; with S_churn = 0 (the
default) they are deterministic. :func:`euler` matches k-diffusion's ``sample_euler`` and
diffusers' ``EulerDiscreteScheduler``; :func:`heun` is EDM's Algorithm 2 (k-diffusion's
``sample_heun``), with an Euler step into sigma = 0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, validate


def _churn(x_t, s, sigma, num_steps, s_churn, s_tmin, s_tmax, s_noise, grid):
    """EDM Algorithm 2 lines 4-6: raise the noise level from sigma to sigma_hat.

    Returns (x~_hat, sigma_hat, t_hat, alpha_hat).
    """
    if s_churn == 0:
        return x_t, sigma, s.t, s.alpha
    gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    z = jax.random.normal(s.key, x_t.shape, jnp.float32)
    x_hat = x_t + jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * s_noise * z
    t_hat = jnp.where(gamma > 0, grid.process.t_from_sigma_ratio(sigma_hat), s.t)
    alpha_hat = jnp.where(gamma > 0, grid.process.alpha(t_hat), s.alpha)
    return x_hat, sigma_hat, t_hat, alpha_hat


def euler(denoise, x, grid, *, key=None, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler's method on the PF-ODE (k-diffusion ``sample_euler``; EDM churn optional)."""
    validate("euler", x, grid, key, stochastic=s_churn != 0)
    dtype, n = x.dtype, grid.num_steps

    def step(x, s):
        sigma, sigma_next = s.sigma / s.alpha, s.sigma_next / s.alpha_next
        xt = x.astype(jnp.float32) / s.alpha
        xt, sigma_hat, t_hat, alpha_hat = _churn(xt, s, sigma, n, s_churn, s_tmin, s_tmax, s_noise, grid)
        d = (xt - denoise((alpha_hat * xt).astype(dtype), t_hat)) / sigma_hat
        xt = xt + (sigma_next - sigma_hat) * d
        return (s.alpha_next * xt).astype(dtype)

    return run_steps(step, x, grid, key)


euler.order = 1
euler.stochastic = False


def heun(denoise, x, grid, *, key=None, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2); Euler for the step into sigma = 0.

    Uses 2N - 1 model evaluations on a grid that ends at sigma = 0, 2N otherwise.
    """
    validate("heun", x, grid, key, stochastic=s_churn != 0)
    dtype, n = x.dtype, grid.num_steps

    def step(x, s):
        sigma, sigma_next = s.sigma / s.alpha, s.sigma_next / s.alpha_next
        xt = x.astype(jnp.float32) / s.alpha
        xt, sigma_hat, t_hat, alpha_hat = _churn(xt, s, sigma, n, s_churn, s_tmin, s_tmax, s_noise, grid)
        d = (xt - denoise((alpha_hat * xt).astype(dtype), t_hat)) / sigma_hat
        dt = sigma_next - sigma_hat
        x_euler = xt + dt * d

        def correct(_):
            d2 = (x_euler - denoise((s.alpha_next * x_euler).astype(dtype), s.t_next)) / sigma_next
            return xt + dt * 0.5 * (d + d2)

        xt = jax.lax.cond(sigma_next == 0, lambda _: x_euler, correct, None)
        return (s.alpha_next * xt).astype(dtype)

    return run_steps(step, x, grid, key)


heun.order = 2
heun.stochastic = False
