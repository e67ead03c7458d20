"""Learned reverse-process variances and the variational bound (Nichol & Dhariwal 2021, iDDPM).

A DDPM reverse step ``p(x_s | x_t) = N(mu, Sigma)`` takes its mean from the denoiser
(the posterior mean of ``q(x_s | x_t, x0_hat)``) and its variance from one of:

* ``fixed_small`` -- the posterior variance beta~ = beta (1 - abar_s) / (1 - abar_t)
  (Ho et al. 2020's sigma_t^2 = beta~_t; diffusers' ``variance_type="fixed_small"``);
* ``fixed_large`` -- beta itself (Ho et al.'s sigma_t^2 = beta_t; ``"fixed_large"``);
* ``learned_range`` -- iDDPM Eq. 15, ``log Sigma = f log beta + (1 - f) log beta~`` with
  ``f = (v + 1) / 2`` and ``v`` the network's extra output channels (DiT's "learned sigma",
  diffusers' ``"learned_range"``).

Between two grid points t -> s of any (respaced) discrete chain, ``beta = 1 - abar_t / abar_s``
(iDDPM Sec. 4, respacing), which in the (alpha, sigma) coordinates of the samplers is
``sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2``.

The variance is learned through the variational bound's terms (Ho et al. 2020, Eq. 5):
``L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))`` for t >= 1 and the discretised
Gaussian decoder ``L_0 = -log p(x0 | x_1)`` (Ho et al. Eq. 13) for 8-bit data in [-1, 1]; both in
bits per dimension, as iDDPM's / ADM's code (``_vb_terms_bpd``) computes them. iDDPM trains
``L_hybrid = L_simple + lambda L_vlb`` (Eq. 16) with lambda = 0.001 and a stop-gradient on the mean
in the L_vlb term, so that the bound trains the variance only; see :func:`vlb_term` and
:func:`jaxdiff.losses.diffusion_loss`.

Time is diffusers' timestep index (``DiscreteVP``): ``alpha_t^2 = abar_t = prod_{i<=t} (1 - beta_i)``
for t = 0 .. T-1, and the step from t = 0 goes to the data (abar = 1).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.processes import DiscreteVP, Process

__all__ = ["VARIANCES", "SAMPLER_VARIANCES", "learned_range_log_variance", "step_log_variances",
           "normal_kl", "discretized_gaussian_log_likelihood", "posterior_tables", "vlb_term",
           "check_learned_variance"]

VARIANCES = ("fixed", "learned_range")
"""Values of ``config.diffusion.variance``: what the model learns besides its prediction."""

SAMPLER_VARIANCES = ("fixed_small", "fixed_large", "learned_range")
"""The reverse-step variances of :func:`jaxdiff.samplers.ddpm`."""


def learned_range_log_variance(v, log_beta, log_beta_tilde):
    """iDDPM Eq. 15: ``f log beta + (1 - f) log beta~`` with ``f = (v + 1) / 2``.

    ``v`` is the raw network output (not clipped: as in iDDPM, ADM, DiT and diffusers, values
    outside [-1, 1] extrapolate)."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_beta_tilde


def step_log_variances(alpha, sigma, alpha_next, sigma_next):
    """``(log beta, log beta~)`` of the grid step (alpha, sigma) -> (alpha_next, sigma_next).

    beta = sigma^2 - (alpha / alpha_next)^2 sigma_next^2 (= 1 - abar_t / abar_s on a VP chain) and
    beta~ = beta sigma_next^2 / sigma^2. beta~ is 0 (log -inf) on the step into the data."""
    a_ts = alpha / alpha_next
    beta = jnp.maximum(sigma**2 - a_ts**2 * sigma_next**2, 0.0)
    beta_tilde = beta * sigma_next**2 / sigma**2
    return jnp.log(beta), jnp.log(beta_tilde)


@jax.custom_jvp
def _x_plus_expm1_neg(x):
    """x + e^-x - 1 (>= 0), without the cancellation of -1 + e^-x for small |x| in value or
    derivative (1 - e^-x = -expm1(-x))."""
    return x + jnp.expm1(-x)


@_x_plus_expm1_neg.defjvp
def _x_plus_expm1_neg_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _x_plus_expm1_neg(x), -jnp.expm1(-x) * dx


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats.

    Written as ``(d + e^-d - 1 + (mean1 - mean2)^2 e^-logvar2) / 2`` with d = logvar2 - logvar1 and
    the first part evaluated without cancellation: near the end of a DDPM chain beta and beta~
    differ by ~1e-6 relative, and ``-1 + e^-d`` in float32 would round the variance's signal away."""
    return 0.5 * (_x_plus_expm1_neg(logvar2 - logvar1) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _log_diff_ndtr(a, b):
    """log(Phi(b) - Phi(a)) for a <= b, evaluated in the tail the interval lies in (no
    cancellation of two values near 1)."""
    flip = (a + b) > 0  # right tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    lo, hi = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_hi, log_lo = jax.scipy.special.log_ndtr(hi), jax.scipy.special.log_ndtr(lo)
    return log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_lo - log_hi, 0.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, *, bins: int = 256):
    """log-probability of ``x`` (data on ``bins`` levels scaled to [-1, 1]) under N(mean, scale^2)
    integrated over each level's bin, the outermost bins extended to -inf / +inf (Ho et al.
    2020, Eq. 13). Elementwise, nats. Uses the exact normal CDF (ADM's code uses a tanh
    approximation, which differs by < 1e-3 in probability)."""
    half = 1.0 / (bins - 1)
    inv = jnp.exp(-log_scale)
    upper = inv * (x - mean + half)
    lower = inv * (x - mean - half)
    edge = 1.0 - half  # x = -1 and x = +1 are the outermost levels (ADM: |x| > 0.999)
    return jnp.where(x < -edge, jax.scipy.special.log_ndtr(upper),
                     jnp.where(x > edge, jax.scipy.special.log_ndtr(-lower), _log_diff_ndtr(lower, upper)))


@functools.lru_cache(maxsize=16)
def posterior_tables(alphas_cumprod: tuple) -> dict[str, np.ndarray]:
    """Per-timestep float64 tables of the chain's posterior q(x_{t-1} | x_t, x0), t = 0 .. T-1
    (abar_{-1} = 1):

    * ``coef_x0`` = sqrt(abar_{t-1}) beta_t / (1 - abar_t), ``coef_xt`` = sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t);
    * ``log_beta`` = log beta_t;
    * ``log_beta_tilde`` = log beta~_t, with t = 0 (beta~_0 = 0) given beta~_1's value, as iDDPM's
      ``posterior_log_variance_clipped`` (the decoder's variance is then learned between
      beta~_1 and beta_0).
    """
    ac = np.asarray(alphas_cumprod, np.float64)
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1.0 - ac / prev
    beta_tilde = beta * (1.0 - prev) / (1.0 - ac)
    log_bt = np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]])) if len(ac) > 1 else np.log(beta)
    out = {
        "coef_x0": np.sqrt(prev) * beta / (1.0 - ac),
        "coef_xt": np.sqrt(ac / prev) * (1.0 - prev) / (1.0 - ac),
        "log_beta": np.log(beta),
        "log_beta_tilde": log_bt,
    }
    for v in out.values():
        v.setflags(write=False)
    return out


def check_learned_variance(process: Process, t_density: str = "default") -> None:
    """The bound's terms need a discrete chain sampled at its integer timesteps."""
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"diffusion.variance='learned_range' (iDDPM's learned variances) needs the discrete_vp "
                         f"process (a DDPM chain), not {type(process).__name__}")
    if t_density != "default":
        raise ValueError(f"diffusion.variance='learned_range' needs diffusion.t_density='default' (integer "
                         f"timesteps: the bound's KL terms are per step), not {t_density!r}")
    if process.alphas_cumprod[-1] <= 0.0:
        raise ValueError("diffusion.variance='learned_range' needs abar_T > 0: the zero-terminal-SNR chain's "
                         "last step has 1 - abar_t = 1 and log beta = 0, but its beta~ is ill-defined; use "
                         "rescale_betas_zero_snr=False")


def vlb_term(process: DiscreteVP, x0, x_t, t, x0_hat, v, *, bins: int = 256):
    """The variational bound's term at integer timesteps ``t`` (B,), in bits per dimension (B,).

    For t >= 1: ``KL(q(x_{t-1} | x_t, x0) || N(mu(x_t, x0_hat), Sigma(v)))`` averaged over the
    dimensions; for t = 0: the discretised decoder's negative log-likelihood of ``x0`` under
    ``N(x0_hat, Sigma(v))``. ``Sigma`` is iDDPM's learned range between ``beta_t`` and ``beta~_t``
    (:func:`posterior_tables`). Divided by log 2 (ADM's ``_vb_terms_bpd``). ``x0_hat`` is used as
    given: pass ``stop_gradient(x0_hat)`` for iDDPM's L_hybrid.
    """
    tab = {k: jnp.asarray(v_, jnp.float32) for k, v_ in posterior_tables(process.alphas_cumprod).items()}
    ti = jnp.asarray(t).astype(jnp.int32)
    b = lambda name: jnp.reshape(tab[name][ti], (-1,) + (1,) * (x0.ndim - 1))  # noqa: E731
    mean_model = b("coef_x0") * x0_hat + b("coef_xt") * x_t
    mean_gap = b("coef_x0") * (x0 - x0_hat)  # mean_true - mean_model, without the x_t terms' cancellation
    log_var = learned_range_log_variance(v.astype(jnp.float32), b("log_beta"), b("log_beta_tilde"))
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(normal_kl(mean_gap, b("log_beta_tilde"), 0.0, log_var), axis=axes)
    # Each branch is evaluated at harmless values where the other one is selected, so that its
    # gradient there is 0, not 0 * inf (e.g. the decoder's far tails at large t).
    first = jnp.reshape(ti == 0, (-1,) + (1,) * (x0.ndim - 1))
    nll = -jnp.mean(discretized_gaussian_log_likelihood(
        x0, jnp.where(first, mean_model, x0), 0.5 * jnp.where(first, log_var, 0.0), bins=bins), axis=axes)
    return jnp.where(ti == 0, nll, kl) / math.log(2.0)
