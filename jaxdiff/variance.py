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
           "vlb_bits_per_dim", "check_learned_variance"]

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
    """x + e^-x - 1 (>= 0) without cancellation: its series x^2/2 - x^3/6 + ... + x^6/720 for
    |x| < 0.1 (truncation < 5e-9 relative; above 0.1 the direct form's float32 rounding is
    ~ eps / |x|, < 5e-6 relative), and the derivative 1 - e^-x as -expm1(-x)."""
    small = jnp.abs(x) < 0.1
    xs = jnp.where(small, x, 0.0)
    series = 0.5 * xs * xs * (1.0 - xs / 3.0 * (1.0 - xs / 4.0 * (1.0 - xs / 5.0 * (1.0 - xs / 6.0))))
    return jnp.where(small, series, x + jnp.expm1(-jnp.where(small, 1.0, x)))


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
    # x = -1 and x = +1 are the outermost levels: ADM's |x| > 0.999 for 256 levels (the same
    # fraction of a level's spacing otherwise), which decides continuous data (latents) as ADM does
    edge = 1.0 - 0.255 / (bins - 1)
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
      beta~_1 and beta_0);
    * ``log_ratio`` = log beta_t - log beta~_t (the t = 0 one clipped likewise), from
      log1p(abar_{t-1} beta_t / (1 - abar_{t-1})) in float64: near the end of a chain it is ~1e-6
      while the two logs are ~ -4, so a float32 difference of the logs would keep one digit.
    """
    ac = np.asarray(alphas_cumprod, np.float64)
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1.0 - ac / prev
    beta_tilde = beta * (1.0 - prev) / (1.0 - ac)
    log_bt = np.log(np.concatenate([beta_tilde[1:2], beta_tilde[1:]])) if len(ac) > 1 else np.log(beta)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log1p(prev * beta / (1.0 - prev))  # beta / beta~ = (1 - abar_t) / (1 - abar_{t-1})
    ratio[0] = np.log(beta[0]) - log_bt[0]
    out = {
        "coef_x0": np.sqrt(prev) * beta / (1.0 - ac),
        "coef_xt": np.sqrt(ac / prev) * (1.0 - prev) / (1.0 - ac),
        "log_beta": np.log(beta),
        "log_beta_tilde": log_bt,
        "log_ratio": ratio,
    }
    for v in out.values():
        v.setflags(write=False)
    return out


def check_learned_variance(process: Process, t_density: str = "default", prediction: str | None = None) -> None:
    """The bound's terms need a discrete chain sampled at its integer timesteps, and an x0_hat
    that is finite at every one of them."""
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"diffusion.variance='learned_range' (iDDPM's learned variances) needs the discrete_vp "
                         f"process (a DDPM chain), not {type(process).__name__}")
    if t_density != "default":
        raise ValueError(f"diffusion.variance='learned_range' needs diffusion.t_density='default' (integer "
                         f"timesteps: the bound's KL terms are per step), not {t_density!r}")
    if prediction in ("epsilon", "score", "velocity") and process.alphas_cumprod[-1] <= 0.0:
        raise ValueError(f"diffusion.variance='learned_range' with prediction {prediction!r} on a zero-terminal-SNR "
                         "chain: at its last step alpha = 0 and x0_hat (x0 = (x - sigma eps) / alpha; a velocity "
                         "there carries no information about x0), which the bound's mean needs, is infinite; use "
                         "v_prediction (Lin et al. 2024) or sample")


def vlb_term(process: DiscreteVP, x0, x_t, t, x0_hat, v=None, *, variance: str = "learned_range",
             bins: int = 256):
    """The variational bound's term at integer timesteps ``t`` (B,), in bits per dimension (B,).

    For t >= 1: ``KL(q(x_{t-1} | x_t, x0) || N(mu(x_t, x0_hat), Sigma))`` averaged over the
    dimensions; for t = 0: the discretised decoder's negative log-likelihood of ``x0`` under
    ``N(x0_hat, Sigma)``. ``Sigma``: ``learned_range`` -- iDDPM's interpolation by ``v`` between
    ``beta_t`` and ``beta~_t`` (:func:`posterior_tables`); ``fixed_small`` -- beta~_t;
    ``fixed_large`` -- beta_t (at t = 0 both fixed ones take beta~_1, as ADM's tables do).
    Divided by log 2 (ADM's ``_vb_terms_bpd``). ``x0_hat`` is used as given: pass
    ``stop_gradient(x0_hat)`` for iDDPM's L_hybrid.
    """
    if variance not in SAMPLER_VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(SAMPLER_VARIANCES)}")
    if (v is None) != (variance != "learned_range"):
        raise ValueError("vlb_term: pass v exactly when variance='learned_range'")
    tab = {k: jnp.asarray(v_, jnp.float32) for k, v_ in posterior_tables(process.alphas_cumprod).items()}
    ti = jnp.asarray(t).astype(jnp.int32)
    b = lambda name: jnp.reshape(tab[name][ti], (-1,) + (1,) * (x0.ndim - 1))  # noqa: E731
    mean_model = b("coef_x0") * x0_hat + b("coef_xt") * x_t
    mean_gap = b("coef_x0") * (x0 - x0_hat)  # mean_true - mean_model, without the x_t terms' cancellation
    first = jnp.reshape(ti == 0, (-1,) + (1,) * (x0.ndim - 1))
    # excess = log Sigma - log beta~, in [0, log_ratio] over the learned range: kept apart from the
    # logs so that the KL's variance part (excess + e^-excess - 1) / 2 keeps its precision
    if variance == "learned_range":
        excess = (v.astype(jnp.float32) + 1.0) / 2.0 * b("log_ratio")  # iDDPM Eq. 15
    elif variance == "fixed_small":
        excess = jnp.zeros_like(b("log_ratio"))
    else:  # fixed_large; t = 0 takes beta~_1 (ADM's table)
        excess = jnp.where(first, 0.0, b("log_ratio"))
    log_var = b("log_beta_tilde") + excess
    axes = tuple(range(1, x0.ndim))
    kl = jnp.mean(0.5 * (_x_plus_expm1_neg(excess) + mean_gap**2 * jnp.exp(-log_var)), axis=axes)
    # Each branch is evaluated at harmless values where the other one is selected, so that its
    # gradient there is 0, not 0 * inf (e.g. the decoder's far tails at large t).
    nll = -jnp.mean(discretized_gaussian_log_likelihood(
        x0, jnp.where(first, mean_model, x0), 0.5 * jnp.where(first, log_var, 0.0), bins=bins), axis=axes)
    return jnp.where(ti == 0, nll, kl) / math.log(2.0)


def vlb_bits_per_dim(denoise, process: DiscreteVP, x0, key, *, variance: str = "fixed_small",
                     clip_denoised: float | None = None, bins: int = 256):
    """The variational bound on the negative log-likelihood of 8-bit data, term by term, in bits
    per dimension (Ho et al. 2020, Eq. 5; iDDPM's NLL tables; ADM's ``calc_bpd_loop``):

    ``L_prior + sum_{t >= 1} L_{t-1} + L_0`` with ``L_prior = KL(q(x_{T-1} | x0) || N(0, I))``,
    every term from one draw of ``x_t ~ q(x_t | x0)`` (independent per t), T network calls in a
    ``lax.map``. ``denoise(x, t) -> x0_hat``, or ``-> (x0_hat, v)`` with ``variance="learned_range"``
    (:func:`jaxdiff.modeling.denoiser`); ``clip_denoised``: clip x0_hat to [-c, c] first (ADM's
    ``image_nll.py`` clips to 1). ``x0``: data on ``bins`` levels scaled to [-1, 1].

    Returns ``{"total", "prior", "decoder"}`` of shape (B,) and ``"terms"`` (T, B), the term at
    each t (t = 0 is the decoder's).
    """
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"vlb_bits_per_dim: the bound is a sum over a discrete chain's steps; got "
                         f"{type(process).__name__} (for continuous processes: jaxdiff.metrics.likelihood)")
    T = process.num_train_timesteps
    x0 = jnp.asarray(x0, jnp.float32)
    batch = x0.shape[0]

    def one(args):
        t, k = args
        tb = jnp.full((batch,), t, jnp.float32)
        x_t = process.marginal(x0, tb, jax.random.normal(k, x0.shape, jnp.float32))
        out = denoise(x_t, tb)
        v = None
        if variance == "learned_range":
            out, v = out
        x0_hat = out.astype(jnp.float32)
        if clip_denoised is not None:
            x0_hat = jnp.clip(x0_hat, -clip_denoised, clip_denoised)
        return vlb_term(process, x0, x_t, tb, x0_hat, v, variance=variance, bins=bins)

    terms = jax.lax.map(one, (jnp.arange(T, dtype=jnp.float32), jax.random.split(key, T)))
    a = jnp.float32(math.sqrt(process.alphas_cumprod[-1]))
    log_var_T = jnp.float32(math.log1p(-process.alphas_cumprod[-1]))
    prior = jnp.mean(normal_kl(a * x0, log_var_T, 0.0, 0.0), axis=tuple(range(1, x0.ndim))) / math.log(2.0)
    return {"total": prior + jnp.sum(terms, axis=0), "prior": prior, "decoder": terms[0], "terms": terms}
