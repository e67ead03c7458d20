"""Ancestral samplers and DPM-Solver-2 (Crowson's k-diffusion, ``k_diffusion/sampling.py``).

* :func:`euler_ancestral` -- ``sample_euler_ancestral``;
* :func:`dpm2` -- ``sample_dpm_2``: DPM-Solver-2 (Lu et al. 2022, Algorithm 1 with r = 1/2)
  in the variance-exploding frame, the midpoint taken geometrically in sigma / alpha, with EDM's
  churn (Karras et al. 2022, Algorithm 2) optional;
* :func:`dpm2_ancestral` -- ``sample_dpm_2_ancestral``;
* :func:`dpmpp_2s_ancestral` -- ``sample_dpmpp_2s_ancestral``: DPM-Solver++(2S) (Lu et al. 2022b,
  Algorithm 1) to the ancestral step's lower noise level, then fresh noise.

All are written in (alpha, sigma) coordinates with the VE-frame step of k-diffusion underneath
(x~ = x / alpha, s = sigma / alpha). An ancestral step from s to s' (``get_ancestral_step``)
splits s' into s_down, reached deterministically, and s_up, added as fresh noise:
s_up = min(s', eta s' sqrt(1 - s'^2 / s^2)), s_down = sqrt(s'^2 - s_up^2). In the target's
(alpha, sigma) coordinates both are multiplied by alpha', which keeps them finite where
alpha = 0 (s = inf: flows at t = 1, zero-terminal-SNR chains). A second-order step *from* alpha = 0
has no finite midpoint in sigma / alpha, so it is a first-order step (as Heun's is).

Noise: one standard normal per step, drawn from the step's key with
``jax.random.normal(step.key, x.shape, float32)`` (the per-step keys are
``jax.random.split(key, N)``); it is scaled by ``s_noise`` and added wherever k-diffusion calls its
``noise_sampler``. ``eta = 0`` gives the deterministic sampler and needs no key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, safe_div, validate
from jaxdiff.samplers.euler import churned_eval

__all__ = ["euler_ancestral", "dpm2", "dpm2_ancestral", "dpmpp_2s_ancestral", "ancestral_step", "point_at_ratio"]


def ancestral_step(alpha, sigma, alpha_to, sigma_to, eta):
    """k-diffusion's ``get_ancestral_step`` in the (alpha, sigma) coordinates of the target point.

    Returns ``(sigma_down, sigma_up)``, both multiplied by ``alpha_to``: the deterministic part of
    the step goes to the point (alpha_to, sigma_down) and ``sigma_up * z`` is then added. With
    q = s_to / s (0 where alpha = 0): sigma_up = sigma_to min(1, eta sqrt(1 - q^2)) and
    sigma_down^2 = sigma_to^2 ((1 - eta^2) + eta^2 q^2) (written without the cancellation of
    sigma_to^2 - sigma_up^2 when q is small).
    """
    q = safe_div(sigma_to * alpha, alpha_to * sigma)
    one_minus_q2 = jnp.maximum(1.0 - q * q, 0.0)
    up_frac = eta * jnp.sqrt(one_minus_q2)
    capped = up_frac >= 1.0
    up = sigma_to * jnp.minimum(up_frac, 1.0)
    down2 = jnp.maximum((1.0 - eta * eta) + eta * eta * q * q, 0.0)
    down = jnp.where(capped, 0.0, sigma_to * jnp.sqrt(down2))
    return down, up


def point_at_ratio(process, s):
    """``(t, alpha, sigma)`` of the point whose VE-frame noise level sigma / alpha is ``s``."""
    t = process.t_from_sigma_ratio(s)
    alpha = process.alpha(t).astype(jnp.float32)
    return t.astype(jnp.float32), alpha, alpha * s


def _needs_key(eta, s_noise) -> bool:
    static = lambda v: isinstance(v, (int, float))  # noqa: E731
    if static(eta) and eta < 0:
        raise ValueError(f"ancestral samplers: eta must be >= 0 (0: deterministic, 1: ancestral), got {eta}")
    return not ((static(eta) and eta == 0) or (static(s_noise) and s_noise == 0))


def _normal(key, x):
    return jax.random.normal(key, x.shape, jnp.float32)


def euler_ancestral(denoise, x, grid, *, key=None, eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``).

    x' = alpha' x0_hat + sigma_down eps_hat + s_noise sigma_up z. With eta = 0 it is :func:`euler`
    (DDIM); with eta = 1 on a VP process it is DDPM's ancestral step in the VE frame.
    """
    needs_key = _needs_key(eta, s_noise)
    validate("euler_ancestral", x, grid, key, stochastic=needs_key)
    dtype = x.dtype

    def step(x, s):
        x = x.astype(jnp.float32)
        d = denoise(x.astype(dtype), s.t).astype(jnp.float32)
        eps = (x - s.alpha * d) / s.sigma
        down, up = ancestral_step(s.alpha, s.sigma, s.alpha_next, s.sigma_next, eta)
        out = s.alpha_next * d + down * eps
        if needs_key:
            out = out + (s_noise * up) * _normal(s.key, x)
        return out.astype(dtype)

    return run_steps(step, x, grid, key)


euler_ancestral.order = 1
euler_ancestral.stochastic = True


def _dpm2_update(denoise, dtype, process, x, d, eps, alpha, sigma, alpha_to, sigma_to, first_order):
    """One DPM-Solver-2 step (k-diffusion's form) from (alpha, sigma) to (alpha_to, sigma_to), given
    the x0_hat ``d`` and eps_hat ``eps`` at the start; Euler where ``first_order``.

    In the VE frame: s_mid = sqrt(s s_to), x~_2 = x~ + (s_mid - s) eps, x~' = x~ + (s_to - s) eps_2;
    in (alpha, sigma): x_2 = alpha_mid d + sigma_mid eps and
    x' = [alpha_to d + sigma_to eps] + (sigma_to - alpha_to s) (eps_2 - eps).
    """
    x_euler = alpha_to * d + sigma_to * eps

    def second(_):
        s0 = jnp.where(first_order, 1.0, safe_div(sigma, alpha))
        s1 = jnp.where(first_order, 0.5, safe_div(sigma_to, alpha_to))
        s_mid = jnp.exp(0.5 * (jnp.log(s0) + jnp.log(s1)))
        t_mid, a_mid, sg_mid = point_at_ratio(process, s_mid)
        x2 = a_mid * d + sg_mid * eps
        d2 = denoise(x2.astype(dtype), t_mid).astype(jnp.float32)
        eps2 = (x2 - a_mid * d2) / sg_mid
        return x_euler + (sigma_to - alpha_to * s0) * (eps2 - eps)

    return jax.lax.cond(first_order, lambda _: x_euler, second, None)


def dpm2(denoise, x, grid, *, key=None, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0):
    """DPM-Solver-2 with k-diffusion's geometric midpoint (``sample_dpm_2``); EDM churn optional.

    Two model evaluations per step; the step into sigma = 0 and a step from alpha = 0 are Euler.
    """
    validate("dpm2", x, grid, key, stochastic=s_churn != 0)
    dtype, process = x.dtype, grid.process

    def step(x, s):
        x, t, alpha, sigma, d, eps = churned_eval(denoise, x, s, grid, dtype, s_churn, s_tmin, s_tmax, s_noise)
        first = (s.sigma_next == 0) | (alpha == 0)
        out = _dpm2_update(denoise, dtype, process, x, d, eps, alpha, sigma, s.alpha_next, s.sigma_next, first)
        return out.astype(dtype)

    return run_steps(step, x, grid, key)


dpm2.order = 2
dpm2.stochastic = False


def dpm2_ancestral(denoise, x, grid, *, key=None, eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with DPM-Solver-2 steps to sigma_down (``sample_dpm_2_ancestral``).

    Where sigma_down = 0 the step is Euler (to x0_hat). Unlike k-diffusion, the noise sigma_up z is
    added there too; the two differ only for eta > 1 (where k-diffusion drops it) or from alpha = 0.
    """
    needs_key = _needs_key(eta, s_noise)
    validate("dpm2_ancestral", x, grid, key, stochastic=needs_key)
    dtype, process = x.dtype, grid.process

    def step(x, s):
        x = x.astype(jnp.float32)
        d = denoise(x.astype(dtype), s.t).astype(jnp.float32)
        eps = (x - s.alpha * d) / s.sigma
        down, up = ancestral_step(s.alpha, s.sigma, s.alpha_next, s.sigma_next, eta)
        first = (down == 0) | (s.alpha == 0)
        out = _dpm2_update(denoise, dtype, process, x, d, eps, s.alpha, s.sigma, s.alpha_next, down, first)
        if needs_key:
            out = out + (s_noise * up) * _normal(s.key, x)
        return out.astype(dtype)

    return run_steps(step, x, grid, key)


dpm2_ancestral.order = 2
dpm2_ancestral.stochastic = True


def dpmpp_2s_ancestral(denoise, x, grid, *, key=None, eta: float = 1.0, s_noise: float = 1.0):
    """Ancestral sampling with DPM-Solver++(2S) steps (``sample_dpmpp_2s_ancestral``).

    With lambda = log(alpha / sigma), h = lambda_down - lambda and the midpoint lambda + h / 2:
    x_2 = (alpha_mid / alpha) e^{-h/2} x + alpha_mid (1 - e^{-h/2}) x0_hat,
    x' = (sigma_down / sigma) x + alpha' (1 - e^{-h}) x0_hat(x_2) + s_noise sigma_up z.
    Where sigma_down = 0 or alpha = 0 the deterministic part is first order.
    """
    needs_key = _needs_key(eta, s_noise)
    validate("dpmpp_2s_ancestral", x, grid, key, stochastic=needs_key)
    dtype, process = x.dtype, grid.process

    def step(x, s):
        x = x.astype(jnp.float32)
        d = denoise(x.astype(dtype), s.t).astype(jnp.float32)
        eps = (x - s.alpha * d) / s.sigma
        down, up = ancestral_step(s.alpha, s.sigma, s.alpha_next, s.sigma_next, eta)
        first = (down == 0) | (s.alpha == 0)
        x_first = s.alpha_next * d + down * eps

        def second(_):
            lam = jnp.where(first, 0.0, jnp.log(jnp.where(first, 1.0, s.alpha)) - jnp.log(s.sigma))
            lam_down = jnp.where(first, -1.0, jnp.log(s.alpha_next) - jnp.log(jnp.where(first, 1.0, down)))
            h = lam_down - lam
            t_mid, a_mid, sg_mid = point_at_ratio(process, jnp.exp(-(lam + 0.5 * h)))
            x2 = (a_mid / jnp.where(first, 1.0, s.alpha)) * jnp.exp(-0.5 * h) * x - a_mid * jnp.expm1(-0.5 * h) * d
            d2 = denoise(x2.astype(dtype), t_mid).astype(jnp.float32)
            return (down / s.sigma) * x - s.alpha_next * jnp.expm1(-h) * d2

        out = jax.lax.cond(first, lambda _: x_first, second, None)
        if needs_key:
            out = out + (s_noise * up) * _normal(s.key, x)
        return out.astype(dtype)

    return run_steps(step, x, grid, key)


dpmpp_2s_ancestral.order = 2
dpmpp_2s_ancestral.stochastic = True
