"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095).

Written in the variance-exploding frame with lambda = -log(sigma / alpha), as k-diffusion's
``sample_dpmpp_2m``; equivalent to diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, safe_div, validate


def dpmpp_2m(denoise, x, grid, *, key=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in lambda.

    The first step, and the step into sigma = 0, are first order (DDIM).
    """
    validate("dpmpp_2m", x, grid, key, stochastic=False)
    dtype = x.dtype

    def step(carry, s):
        x, old_d, h_last = carry
        sigma, sigma_next = s.sigma / s.alpha, s.sigma_next / s.alpha_next
        d = denoise(x, s.t).astype(jnp.float32)
        xt = x.astype(jnp.float32) / s.alpha
        final = sigma_next == 0
        h = jnp.where(final, 1.0, jnp.log(sigma) - jnp.log(jnp.where(final, 1.0, sigma_next)))
        r = safe_div(h_last, h)
        second = (s.i > 0) & ~final
        coef = jnp.where(second, safe_div(1.0, 2.0 * r), 0.0)
        d_mix = (1.0 + coef) * d - coef * old_d
        # x~_next = (sigma_next / sigma) x~ - expm1(-h) D  (= D when sigma_next = 0).
        xt_next = jnp.where(final, d, (sigma_next / sigma) * xt - jnp.expm1(-h) * d_mix)
        return ((s.alpha_next * xt_next).astype(dtype), d, h)

    x_end, _, _ = run_steps(step, (x, jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.float32)), grid, key)
    return x_end


dpmpp_2m.order = 2
dpmpp_2m.stochastic = False
