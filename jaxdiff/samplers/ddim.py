"""DDPM ancestral sampling and DDIM.

* :func:`ddpm` -- ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020,
  Eq. 6-7, Algorithm 2), written for a general (alpha, sigma) pair as in Kingma et al. 2021
  (VDM, Eq. 26-27); matches diffusers' ``DDPMScheduler`` with ``variance_type="fixed_small"``,
  and with ``"fixed_large"`` / ``"learned_range"`` (iDDPM's learned variances, DiT) under
  ``variance=``.
* :func:`ddim` -- Song et al. 2021 (DDIM), Eq. 12 with the eta-scaled variance of Eq. 16;
  eta = 0 is the deterministic sampler, eta = 1 equals :func:`ddpm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import run_steps, safe_div, validate
from jaxdiff.variance import SAMPLER_VARIANCES, learned_range_log_variance, step_log_variances


def _check_clip(name: str, clip_denoised) -> None:
    """``clip_denoised`` is None (off) or a positive bound: 0 would clip every x0_hat to 0 (the
    config's ``sample.clip_denoised = 0`` means off and is passed as None by jaxdiff.generate)."""
    if isinstance(clip_denoised, (int, float, np.number)) and not clip_denoised > 0:
        raise ValueError(f"{name}: clip_denoised={clip_denoised!r} would clip x0_hat to [-{clip_denoised}, "
                         f"{clip_denoised}]; pass a positive bound (diffusers' clip_sample_range, e.g. 1.0) or None (off)")


def _clip(x0, clip_denoised):
    return x0 if clip_denoised is None else jnp.clip(x0, -clip_denoised, clip_denoised)


def ddpm(denoise, x, grid, *, key=None, clip_denoised: float | None = None, variance: str = "fixed_small"):
    """Ancestral DDPM sampling (Ho et al. 2020, Algorithm 2).

    Args:
      denoise: ``denoise(x, t) -> x0_hat``; with ``variance="learned_range"``
        ``denoise(x, t) -> (x0_hat, v)``, ``v`` the network's variance channels
        (:func:`jaxdiff.modeling.denoiser` with ``with_variance=True``).
      x: state at ``grid.t[0]``.
      grid: time grid (:class:`jaxdiff.schedules.Grid`).
      key: PRNG key (required).
      clip_denoised: clip x0_hat to [-c, c] before the posterior (diffusers' ``clip_sample``);
        ``None``: no clipping (a bound <= 0 is refused).
      variance: the reverse step's variance (:mod:`jaxdiff.variance`): ``fixed_small`` (the
        posterior's beta~, Ho et al.'s sigma^2 = beta~), ``fixed_large`` (beta) or
        ``learned_range`` (iDDPM Eq. 15, between the two by ``v``), each for the grid's own
        (respaced) step; as diffusers' ``DDPMScheduler(variance_type=...)``. The step into the
        data adds no noise.

    Returns:
      The sample at the last grid point.
    """
    validate("ddpm", x, grid, key, stochastic=True)
    _check_clip("ddpm", clip_denoised)
    if variance not in SAMPLER_VARIANCES:
        raise ValueError(f"ddpm: unknown variance {variance!r}; valid: {', '.join(SAMPLER_VARIANCES)}")
    dtype = x.dtype

    def step(x, s):
        out = denoise(x, s.t)
        if variance == "learned_range":
            if not isinstance(out, tuple):
                raise ValueError("ddpm(variance='learned_range') needs denoise(x, t) -> (x0_hat, v)")
            out, v = out
        x0 = _clip(out, clip_denoised)
        a_ts = s.alpha / s.alpha_next
        var_ts = jnp.maximum(s.sigma**2 - a_ts**2 * s.sigma_next**2, 0.0)  # beta of the step
        mean = (a_ts * s.sigma_next**2 / s.sigma**2) * x + (s.alpha_next * var_ts / s.sigma**2) * x0
        if variance == "fixed_small":
            std = jnp.sqrt(var_ts * s.sigma_next**2 / s.sigma**2)
        else:
            last = s.sigma_next == 0  # into the data: no noise (and beta~ = 0 has no log)
            if variance == "fixed_large":
                std = jnp.where(last, 0.0, jnp.sqrt(var_ts))
            else:
                # finite stand-ins on the last step (its noise is 0 anyway), so that gradients through
                # the loop see no log(0)
                log_beta, log_beta_tilde = step_log_variances(
                    s.alpha, s.sigma, jnp.where(last, s.alpha, s.alpha_next), jnp.where(last, 0.5 * s.sigma, s.sigma_next))
                log_var = learned_range_log_variance(v.astype(jnp.float32), log_beta, log_beta_tilde)
                std = jnp.where(last, 0.0, jnp.exp(0.5 * log_var))
        z = jax.random.normal(s.key, x.shape, jnp.float32)
        return (mean + std * z).astype(dtype)

    return run_steps(step, x, grid, key)


ddpm.order = 1
ddpm.stochastic = True


def ddim(denoise, x, grid, *, key=None, eta: float = 0.0, clip_denoised: float | None = None):
    """DDIM (Song et al. 2021, Eq. 12); ``eta`` scales the injected noise (Eq. 16).

    The noise estimate is taken from the unclipped x0_hat, as diffusers' ``DDIMScheduler`` does;
    ``clip_denoised`` (a positive bound, or None for none) clips x0_hat as in :func:`ddpm`.
    ``eta`` may be a traced value (changing it does not recompile); a key is needed if eta > 0.
    """
    validate("ddim", x, grid, key, stochastic=False)
    _check_clip("ddim", clip_denoised)
    if isinstance(eta, (int, float)) and not 0 <= eta <= 1:
        raise ValueError(f"ddim: eta must be in [0, 1] (0: DDIM, 1: DDPM's variance; Song et al. 2021, "
                         f"Eq. 16), got {eta}")
    if key is None and not (isinstance(eta, (int, float)) and eta == 0):
        raise ValueError("ddim with eta != 0 is stochastic: pass key=jax.random.key(...)")
    dtype = x.dtype

    def step(x, s):
        x0_raw = denoise(x, s.t)
        eps = (x - s.alpha * x0_raw) / s.sigma
        x0 = _clip(x0_raw, clip_denoised)
        var = safe_div(s.sigma_next**2, s.sigma**2) * (s.sigma**2 - (s.alpha / s.alpha_next) ** 2 * s.sigma_next**2)
        std = eta * jnp.sqrt(jnp.maximum(var, 0.0))
        dir_coef = jnp.sqrt(jnp.maximum(s.sigma_next**2 - std**2, 0.0))
        out = s.alpha_next * x0 + dir_coef * eps
        if key is not None:
            out = out + std * jax.random.normal(s.key, x.shape, jnp.float32)
        return out.astype(dtype)

    return run_steps(step, x, grid, key)


ddim.order = 1
ddim.stochastic = False
