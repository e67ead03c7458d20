"""Euler and Heun on the probability-flow ODE.

Euler is written in (alpha, sigma) coordinates, x_next = alpha' x0_hat + sigma' eps_hat, which is
the same step as Euler in the variance-exploding frame (x~ = x / alpha, s = sigma / alpha,
dx~/ds = (x~ - D) / s; Karras et al. 2022 Eq. 4), as DDIM, and as Euler in t for the linear
interpolant -- and stays finite where alpha = 0 (flows at t = 1, zero-terminal SNR).

Heun integrates in the frame the process declares (``process.ode_frame``): ``"sigma_ratio"``
(the VE frame; EDM Algorithm 2, k-diffusion ``sample_heun``, diffusers ``HeunDiscreteScheduler``)
or ``"time"`` (dx/dt = alpha'(t) x0 + sigma'(t) eps; diffusers ``FlowMatchHeunDiscreteScheduler``
for rectified flow). Both take EDM's stochastic "churn" (Algorithm 2, lines 4-6) in the VE frame;
with S_churn = 0 (the default) they are deterministic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, safe_div, validate


def _churn(x_t, s, sigma, num_steps, s_churn, s_tmin, s_tmax, s_noise, grid):
    """EDM Algorithm 2 lines 4-6: raise the noise level from sigma to sigma_hat.

    Returns (x~_hat, sigma_hat, t_hat, alpha_hat).
    """
    if s_churn == 0:
        return x_t, sigma, s.t, s.alpha
    gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), min(s_churn / num_steps, math.sqrt(2.0) - 1.0), 0.0)
    sigma_hat = sigma * (1.0 + gamma)
    z = jax.random.normal(s.key, x_t.shape, jnp.float32)
    # sqrt(sigma_hat^2 - sigma^2) = sigma sqrt(gamma (2 + gamma)): exactly 0 where gamma = 0 (the
    # difference of squares can keep a rounding residual of sigma^2 once XLA fuses it into an FMA)
    x_hat = x_t + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise * z
    t_hat = jnp.where(gamma > 0, grid.process.t_from_sigma_ratio(sigma_hat), s.t)
    alpha_hat = jnp.where(gamma > 0, grid.process.alpha(t_hat), s.alpha)
    return x_hat, sigma_hat, t_hat, alpha_hat


def churned_eval(denoise, x, s, grid, dtype, s_churn, s_tmin, s_tmax, s_noise):
    """EDM churn (if ``s_churn`` != 0) at step ``s``, then one model call at the (churned) point.

    Returns ``(x, t, alpha, sigma, x0_hat, eps_hat)`` at that point, x in float32; the shared
    first stage of euler, heun and dpm2.
    """
    x = x.astype(jnp.float32)
    t, alpha, sigma = s.t, s.alpha, s.sigma
    if s_churn != 0:
        xt, sigma_hat, t, alpha = _churn(x / s.alpha, s, s.sigma / s.alpha, grid.num_steps, s_churn, s_tmin,
                                         s_tmax, s_noise, grid)
        x, sigma = alpha * xt, alpha * sigma_hat
    x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
    return x, t, alpha, sigma, x0, (x - alpha * x0) / sigma


def euler(denoise, x, grid, *, key=None, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Euler's method on the PF-ODE (k-diffusion ``sample_euler``; EDM churn optional)."""
    validate("euler", x, grid, key, stochastic=s_churn != 0)
    dtype = x.dtype

    def step(x, s):
        x, t, alpha, sigma, x0, eps = churned_eval(denoise, x, s, grid, dtype, s_churn, s_tmin, s_tmax, s_noise)
        return (s.alpha_next * x0 + s.sigma_next * eps).astype(dtype)

    return run_steps(step, x, grid, key)


euler.order = 1
euler.stochastic = False


def heun(denoise, x, grid, *, key=None, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0):
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 2); Euler for the step into sigma = 0
    (and, in the sigma_ratio frame, for a step from alpha = 0).

    Uses 2N - 1 model evaluations on a grid that ends at sigma = 0, 2N otherwise.
    """
    validate("heun", x, grid, key, stochastic=s_churn != 0)
    dtype = x.dtype

    frame = getattr(grid.process, "ode_frame", "sigma_ratio")
    if frame == "time" and s_churn != 0:
        raise ValueError("heun: S_churn needs the sigma_ratio frame; this process integrates in time")

    if frame == "time":
        process = grid.process

        def step(x, s):
            x = x.astype(jnp.float32)

            def f(x, t, alpha, sigma):
                x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
                da, ds = process.derivatives(t)
                return da * x0 + ds * (x - alpha * x0) / sigma, x0

            d, x0 = f(x, s.t, s.alpha, s.sigma)
            dt = s.t_next - s.t
            x_euler = s.alpha_next * x0 + s.sigma_next * (x - s.alpha * x0) / s.sigma

            def correct(_):
                d2, _ = f(x_euler, s.t_next, s.alpha_next, s.sigma_next)
                return x + dt * 0.5 * (d + d2)

            return jax.lax.cond(s.sigma_next == 0, lambda _: x_euler, correct, None).astype(dtype)

        return run_steps(step, x, grid, key)

    # EDM Algorithm 2 in the VE frame (x~ = x / alpha, s = sigma / alpha), written in (alpha, sigma)
    # coordinates: the VE-frame slope (x~ - D) / s is eps_hat = (x - alpha D) / sigma, the Euler
    # predictor is x' = alpha' D + sigma' eps_hat, and the trapezoidal corrector adds
    # alpha' (s' - s) (eps_hat' - eps_hat) / 2. A step from alpha = 0 (zero terminal SNR: s = inf)
    # is an Euler step, like the step into sigma = 0.
    def step(x, s):
        x, t, alpha, sigma, x0, eps = churned_eval(denoise, x, s, grid, dtype, s_churn, s_tmin, s_tmax, s_noise)
        x_euler = s.alpha_next * x0 + s.sigma_next * eps

        def correct(_):
            x0_2 = denoise(x_euler.astype(dtype), s.t_next).astype(jnp.float32)
            eps_2 = safe_div(x_euler - s.alpha_next * x0_2, s.sigma_next)
            dt = s.sigma_next - s.alpha_next * safe_div(sigma, alpha)  # alpha' (s' - s)
            return x_euler + 0.5 * dt * (eps_2 - eps)

        euler_only = (s.sigma_next == 0) | (alpha == 0)
        return jax.lax.cond(euler_only, lambda _: x_euler, correct, None).astype(dtype)

    return run_steps(step, x, grid, key)


heun.order = 2
heun.stochastic = False
