"""Reverse-SDE predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR 2021).

The forward process ``x_t = alpha(t) x0 + sigma(t) eps`` is the marginal of the linear SDE
``dx = f(t) x dt + g(t) dw`` with (Song et al. 2021, Eq. 5; Kingma et al. 2021, Appendix A)

    f = d log alpha / dt,        g^2 = d sigma^2 / dt - 2 f sigma^2,

and the reverse-time SDE (Eq. 6) is ``dx = [f x - g^2 score(x, t)] dt + g dw_bar``, with the score
from the denoiser, ``score = (alpha x0_hat - x) / sigma^2``. d alpha/dt and d sigma/dt come from
``grid.process.derivatives``, so one sampler covers VP, VE, EDM, discrete chains and flows.

* Predictor: Euler-Maruyama on the reverse SDE from ``t`` to ``t'`` (dt = t' - t < 0):
  ``x' = x + (f x - g^2 score) dt + g sqrt(-dt) z``.
* Corrector: Langevin MCMC at the new point (the paper's corrector algorithms, Appendix G):
  ``x <- x + e score + sqrt(2 e) z'`` with ``e = 2 (snr ||z'|| / ||score||)^2``, the norms taken
  per example over all but the leading (batch) axis and averaged over the batch, as in the paper's
  code (``score_sde/sampling.py``, ``LangevinCorrector``). The VP version multiplies e by the
  discrete chain's 1 - beta_i (>= 0.98 for DDPM's 1000 steps); here e is the VE form for every
  process, since 1 - beta_i has no meaning on a general grid.
* Predictor-corrector (Algorithm 1): each step runs the predictor, then ``n_corrector`` corrector
  steps at the new point. ``n_corrector=0`` is plain Euler-Maruyama.

The step into sigma = 0 (the clean end point of jaxdiff grids) returns the denoiser's x0_hat at
the last noisy point, i.e. Tweedie's posterior mean -- the "noise removal" step of the paper's
code (an Euler-Maruyama step there would overshoot: its drift is 2 (x0_hat - x) for EDM). ``f``
and ``g`` are infinite where alpha = 0, so a grid starting there (zero terminal SNR, flows at
t = 1) raises a ValueError; start just below that point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, validate
from jaxdiff.schedules import require_alpha_start_positive

__all__ = ["reverse_sde_pc", "sde_coefficients"]


def sde_coefficients(process, t, alpha, sigma):
    """(f, g^2) of the forward SDE dx = f x dt + g dw at time t, from d alpha/dt and d sigma/dt.

    f = alpha'(t) / alpha, g^2 = 2 sigma sigma' - 2 f sigma^2 (Song et al. 2021, Eq. 5, for the
    marginals x_t = alpha x0 + sigma eps). ``alpha``, ``sigma`` are the grid's values at t.
    """
    da, ds = process.derivatives(t)
    f = da / alpha
    g2 = 2.0 * sigma * ds - 2.0 * f * sigma**2
    return f, jnp.maximum(g2, 0.0)


def _norm(v):
    """Per-example L2 norms over all but the leading axis, averaged (one norm for a 0/1-d array)."""
    if v.ndim <= 1:
        return jnp.sqrt(jnp.sum(v * v))
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(v * v, (v.shape[0], -1)), axis=1)))


def reverse_sde_pc(denoise, x, grid, *, key=None, n_corrector: int = 1, snr: float = 0.16,
                   s_noise: float = 1.0):
    """Predictor-corrector sampler: Euler-Maruyama on the reverse SDE + Langevin corrector
    (Song et al. 2021, Algorithm 1 and Appendix G; see the module docstring).

    Args:
      denoise, x, grid, key: the shared sampler signature (``key`` is required).
      n_corrector: Langevin steps after each predictor step (the paper's M; 0 = Euler-Maruyama).
      snr: the corrector's signal-to-noise ratio r (the paper uses 0.16 for its VE models).
      s_noise: scale of the predictor's noise (1 = the reverse SDE).

    Model calls: N + n_corrector (N - 1) on a grid ending at sigma = 0 (no corrector there).
    """
    validate("reverse_sde_pc", x, grid, key, stochastic=True)
    require_alpha_start_positive("reverse_sde_pc", grid,
                                 "the reverse SDE's drift f = dlog(alpha)/dt and diffusion g are infinite")
    if int(n_corrector) != n_corrector or n_corrector < 0:
        raise ValueError(f"reverse_sde_pc: n_corrector must be an integer >= 0, got {n_corrector!r}")
    n_corrector = int(n_corrector)
    dtype, process = x.dtype, grid.process

    def score(x, t, alpha, sigma):
        x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
        return (alpha * x0 - x) / sigma**2, x0

    def step(x, s):
        x = x.astype(jnp.float32)
        k_pred, k_corr = jax.random.split(s.key)
        sc, x0 = score(x, s.t, s.alpha, s.sigma)
        f, g2 = sde_coefficients(process, s.t, s.alpha, s.sigma)
        dt = s.t_next - s.t
        z = jax.random.normal(k_pred, x.shape, jnp.float32)
        x_pred = x + (f * x - g2 * sc) * dt + (s_noise * jnp.sqrt(g2 * jnp.abs(dt))) * z

        final = s.sigma_next == 0
        sigma_c = jnp.where(final, 1.0, s.sigma_next)  # finite (unused) branch at sigma = 0, for grads

        def correct(x):
            def langevin(x, k):
                g, _ = score(x, s.t_next, s.alpha_next, sigma_c)
                zc = jax.random.normal(k, x.shape, jnp.float32)
                ratio = _norm(zc) / jnp.maximum(_norm(g), 1e-30)
                e = 2.0 * (snr * ratio) ** 2
                return x + e * g + jnp.sqrt(2.0 * e) * zc, None

            return jax.lax.scan(langevin, x, jax.random.split(k_corr, n_corrector))[0]

        if n_corrector > 0:
            x_pred = jax.lax.cond(final, lambda v: v, correct, x_pred)
        return jnp.where(final, x0, x_pred).astype(dtype)

    return run_steps(step, x, grid, key)


reverse_sde_pc.order = 1
reverse_sde_pc.stochastic = True
