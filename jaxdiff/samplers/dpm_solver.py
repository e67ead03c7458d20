"""DPM-Solver++ multistep samplers (Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095).

Written in the variance-exploding frame with lambda = -log(sigma / alpha), as k-diffusion's
``sample_dpmpp_2m``; equivalent to diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``final_sigmas_type="zero"``.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, safe_div, validate


def dpmpp_2m(denoise, x, grid, *, key=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): second-order multistep in lambda = log(alpha/sigma).

    Written in (alpha, sigma) coordinates, x_next = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) D
    with alpha' (e^{-h} - 1) expanded, so the step from alpha = 0 (flows at t = 1,
    zero-terminal SNR) is finite. The first step, the step after an infinite-lambda point and the
    step into sigma = 0 are first order (DDIM).
    """
    validate("dpmpp_2m", x, grid, key, stochastic=False)
    dtype = x.dtype

    def step(carry, s):
        x, old_d, h_last = carry
        x = x.astype(jnp.float32)
        d = denoise(x.astype(dtype), s.t).astype(jnp.float32)
        lam = jnp.log(s.alpha) - jnp.log(s.sigma)
        lam_next = jnp.log(s.alpha_next) - jnp.log(jnp.where(s.sigma_next == 0, 1.0, s.sigma_next))
        h = lam_next - lam
        ok = (s.i > 0) & (s.sigma_next > 0) & jnp.isfinite(h_last) & jnp.isfinite(h)
        r = safe_div(jnp.where(ok, h_last, 1.0), jnp.where(ok, h, 1.0))
        coef = jnp.where(ok, safe_div(1.0, 2.0 * r), 0.0)
        d_mix = (1.0 + coef) * d - coef * old_d
        ratio = s.sigma_next / s.sigma
        x_next = ratio * x + (s.alpha_next - s.alpha * ratio) * d_mix
        return (x_next.astype(dtype), d, h)

    init = (x, jnp.zeros(x.shape, jnp.float32), jnp.zeros((), jnp.float32))
    x_end, _, _ = run_steps(step, init, grid, key)
    return x_end


dpmpp_2m.order = 2
dpmpp_2m.stochastic = False
