"""Denoising and flow-matching losses with their weightings and time densities.

One function, :func:`diffusion_loss`, covers the objectives the issue lists, all in the
coordinate system ``x_t = alpha(t) x0 + sigma(t) eps``:

* the MSE of the network output against the exact target of its prediction type
  (eps-MSE of DDPM, v-MSE, x0-MSE, flow matching's velocity MSE, score matching);
* weightings, written relative to the x0-space error so they apply to every prediction type:
  ``min_snr`` (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting",
  w = min(SNR, gamma) in x0 terms), ``p2`` (Choi et al. 2022, Eq. 8:
  w = 1 / (k + SNR)^gamma in eps terms), ``edm`` (Karras et al. 2022, Eq. 8 / Table 1:
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 in x0 terms), each written
  so that it is finite, and equal to its limit, at zero SNR (alpha = 0) and infinite SNR
  (sigma = 0) -- see :func:`loss_weight` for the endpoint values;
* time densities: the process's own (uniform integers for DDPM, EDM's log-normal),
  ``uniform``, ``logit_normal`` (Esser et al. 2024, SD3, Eq. 19) and ``lognormal`` over the
  VE-frame sigma (EDM).

Every loss is exactly zero when the network outputs the true target (tested).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.parameterization import PREDICTIONS, edm_vp_coefficients, net_inputs, to_x0
from jaxdiff.processes import Process
from jaxdiff.variance import VARIANCES, check_learned_variance, vlb_term

__all__ = ["WEIGHTINGS", "T_DENSITIES", "sample_times", "exact_target", "x0_error_scale",
           "loss_weight", "diffusion_loss"]

WEIGHTINGS = ("none", "min_snr", "p2", "edm")
T_DENSITIES = ("default", "uniform", "logit_normal", "lognormal")


def _bcast(c, x):
    return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def sample_times(key, batch: int, process: Process, density: str = "default", *,
                 mean: float | None = None, std: float | None = None):
    """Training times of shape (batch,).

    ``default`` -- the process's own density (:meth:`Process.sample_t`);
    ``uniform`` -- uniform on [t_min, t_max];
    ``logit_normal`` -- t = sigmoid(mean + std n) (SD3; default mean 0, std 1), for t in [0, 1];
    ``lognormal`` -- VE-frame sigma = exp(mean + std n) (EDM; default -1.2, 1.2), mapped to t.
    """
    if density == "default":
        return process.sample_t(key, (batch,))
    if density == "uniform":
        return jax.random.uniform(key, (batch,), minval=process.t_min, maxval=process.t_max)
    n = jax.random.normal(key, (batch,))
    if density == "logit_normal":
        u = jax.nn.sigmoid((0.0 if mean is None else mean) + (1.0 if std is None else std) * n)
        return process.t_min + (process.t_max - process.t_min) * u
    if density == "lognormal":
        s = jnp.exp((-1.2 if mean is None else mean) + (1.2 if std is None else std) * n)
        return process.t_from_sigma_ratio(s)
    raise ValueError(f"unknown time density {density!r}; valid: {', '.join(T_DENSITIES)}")


def exact_target(prediction: str, x0, eps, t, process: Process):
    """The exact regression target of ``prediction`` for x_t = alpha x0 + sigma eps."""
    a, s = _bcast(process.alpha(t), x0), _bcast(process.sigma(t), x0)
    if prediction in ("sample", "edm"):
        return x0
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    if prediction == "velocity":
        da, ds = process.derivatives(t)
        return _bcast(da, x0) * x0 + _bcast(ds, x0) * eps
    raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def x0_error_scale(prediction: str, t, process: Process):
    """r(t) with ||out - target||^2 = r(t) ||x0_hat - x0||^2 for a fixed x_t (per example)."""
    a, s = process.alpha(t), process.sigma(t)
    if prediction in ("sample", "edm"):
        return jnp.ones_like(a)
    if prediction == "epsilon":
        return (a / s) ** 2
    if prediction == "v_prediction":
        return ((a**2 + s**2) / s) ** 2
    if prediction == "score":
        return a**2 / s**4
    if prediction == "velocity":
        da, ds = process.derivatives(t)
        return (da - ds * a / s) ** 2
    raise ValueError(f"unknown prediction type {prediction!r}")


def loss_weight(weighting: str, prediction: str, t, process: Process, *, min_snr_gamma: float = 5.0,
                p2_gamma: float = 1.0, p2_k: float = 1.0, sigma_data: float = 0.5):
    """Per-example weight applied to the MSE in the prediction's own space.

    The weighting defines a weight ``w0(SNR)`` on the x0-space error, and the returned weight is
    ``w0 / r`` with ``r`` = :func:`x0_error_scale` (so every prediction type gets the same
    x0-space weighting):

    * ``min_snr`` -- Hang et al. 2023, w0 = min(SNR, gamma): epsilon min(SNR, gamma) / SNR,
      v-prediction min(SNR, gamma) / (SNR + 1) (VP), x0 min(SNR, gamma);
    * ``p2`` -- Choi et al. 2022, Eq. 8: 1 / (k + SNR)^gamma on the eps error, w0 = SNR / (k + SNR)^gamma;
    * ``edm`` -- Karras et al. 2022, Eq. 8 / Table 1: lambda(s) = (s^2 + sigma_data^2) / (s sigma_data)^2
      on the x0 error with s = sigma / alpha, i.e. w0 = 1 / sigma_data^2 + SNR.

    Endpoints. ``w0 / r`` is written out per prediction type in a form with no 0/0 or inf/inf,
    so it is finite at zero SNR (alpha = 0: zero-terminal-SNR DiscreteVP at t_max, RectifiedFlow
    at t = 1) and at infinite SNR (sigma = 0: RectifiedFlow, VPCosine, VPLinear, EDM at t = 0)
    and equals its limit there; away from them it equals ``w0 / r`` up to float rounding.
    E.g. min-SNR-eps -> 1 and P2-eps -> 1 / k^gamma as SNR -> 0, min-SNR-eps -> 0 as SNR -> inf,
    EDM-v -> 1 / (sigma_data^2 sigma^2) at alpha = 0 and 1 / alpha^2 at sigma = 0.
    Two kinds of endpoint have no finite value and get weight **0** (the example is left out of
    the loss -- a finite cap would instead make one example's gradient arbitrarily large):

    * where the limit is +inf: ``edm`` with x0 / ``edm`` outputs at sigma = 0; ``edm`` with
      epsilon / score outputs at alpha = 0; ``p2`` with x0 / ``edm`` outputs at sigma = 0 when
      gamma < 1 (the limit of SNR^(1 - gamma); it is 1 for gamma = 1 and 0 for gamma > 1). At
      these points the target is a fixed function of x_t (x0 = x_t / alpha; eps = x_t / sigma);
    * ``velocity`` where alpha' sigma = alpha sigma' (r = 0: the output carries no information
      about x0) -- only on zero-terminal-SNR DiscreteVP's last interval (t_max - 1, t_max],
      where alpha = 0 throughout and the velocity target is identically 0.

    ``none`` is 1 everywhere. ``min_snr_gamma`` and ``p2_k`` are assumed positive.
    """
    if weighting == "none":
        return jnp.ones_like(jnp.asarray(t, jnp.float32))
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}")
    snr = jnp.exp(process.logsnr(t))  # exactly 0 at alpha = 0 and inf at sigma = 0
    a2, s2 = process.alpha(t) ** 2, process.sigma(t) ** 2
    # Three limit-safe forms per weighting: w0, w0 / SNR (the weight on the eps error) and
    # w0 sigma^2 (= w0 / SNR * alpha^2); each prediction's w0 / r is one of them times a finite factor.
    if weighting == "min_snr":
        g = min_snr_gamma
        w0 = jnp.minimum(snr, g)  # in [0, gamma]
        w_eps = jnp.where(snr > g, g / jnp.where(snr > g, snr, 1.0), 1.0)  # min(SNR, gamma) / SNR
        w0_s2 = w0 * s2
    elif weighting == "p2":
        w_eps = 1.0 / (p2_k + snr) ** p2_gamma  # 1 / k^gamma at SNR = 0, 0 at SNR = inf (gamma > 0)
        # w0 = SNR w_eps; at SNR = inf the limit of SNR^(1 - gamma): +inf, 1 or 0 for gamma <, =, > 1
        at_inf = jnp.where(p2_gamma == 1, 1.0, jnp.where(p2_gamma > 1, 0.0, jnp.inf))
        w0 = jnp.where(jnp.isinf(snr), at_inf, jnp.where(jnp.isinf(snr), 0.0, snr) * w_eps)
        w0_s2 = a2 * w_eps
    else:  # edm
        sd2 = sigma_data**2
        w0 = 1.0 / sd2 + snr  # +inf at SNR = inf
        w_eps = 1.0 + 1.0 / (sd2 * snr)  # +inf at SNR = 0, 1 at SNR = inf
        w0_s2 = s2 / sd2 + a2
    if prediction in ("sample", "edm"):  # r = 1
        w = w0
    elif prediction == "epsilon":  # r = SNR
        w = w_eps
    elif prediction == "score":  # r = SNR / sigma^2
        w = w_eps * s2
    elif prediction == "v_prediction":  # r = (alpha^2 + sigma^2)^2 / sigma^2
        w = w0_s2 / (a2 + s2) ** 2
    else:  # velocity: r = dd^2 / sigma^2 with dd = alpha' sigma - alpha sigma'
        da, ds = process.derivatives(t)
        dd = da * process.sigma(t) - process.alpha(t) * ds
        w = jnp.where(dd == 0, 0.0, w0_s2 / jnp.where(dd == 0, 1.0, dd**2))
    return jnp.where(w == jnp.inf, 0.0, w)  # the +inf limits listed above


def diffusion_loss(net: Callable, x0, key, *, process: Process, prediction: str,
                   weighting: str = "none", t_density: str = "default", t_mean: float | None = None,
                   t_std: float | None = None, min_snr_gamma: float = 5.0, p2_gamma: float = 1.0,
                   p2_k: float = 1.0, sigma_data: float = 0.5, variance: str = "fixed",
                   vlb_weight: float = 0.001, vlb_bins: int = 256):
    """Per-example loss (shape (batch,)) of ``net(x_in, t_in) -> output``.

    Draws t and eps with ``key``, forms x_t, feeds the network what :func:`net_inputs` says for
    the prediction type, and returns ``weight(t) * mean((output - target)^2)`` over the
    non-batch axes. For ``prediction="edm"`` the output is turned into
    D = c_skip x + c_out F and compared with x0 (EDM's loss, Eq. 8).

    ``variance="learned_range"`` (iDDPM, Nichol & Dhariwal 2021, Sec. 3.1; DiT): the network
    outputs ``2 C`` channels, the prediction and the variance interpolation ``v`` of
    :func:`jaxdiff.variance.learned_range_log_variance`, and the loss is iDDPM's L_hybrid (Eq. 16)
    ``w mse + vlb_weight * T * L_t`` with ``L_t`` = :func:`jaxdiff.variance.vlb_term` in bits per
    dimension at the drawn timestep with the mean held fixed (stop-gradient): ``T * L_t`` is an
    unbiased estimate of the bound L_vlb, and ``vlb_weight`` is iDDPM's lambda (0.001; with
    T = 1000 the loss is ADM's / DiT's ``mse + vb``); ``vlb_bins``: the data's levels for the
    decoder term at t = 0. Needs the discrete_vp process and its default (integer) time density.
    """
    k_t, k_eps = jax.random.split(key)
    batch = x0.shape[0]
    learned = variance == "learned_range"
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; valid: {', '.join(VARIANCES)}")
    if learned:
        check_learned_variance(process, t_density, prediction)
    t = sample_times(k_t, batch, process, t_density, mean=t_mean, std=t_std)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = process.marginal(x0, t, eps)
    x_in, t_in = net_inputs(prediction, x_t, t, process, sigma_data)
    out = net(x_in, t_in).astype(jnp.float32)
    if learned:
        c = x0.shape[-1]
        if out.shape[-1] != 2 * c:
            raise ValueError(f"variance='learned_range' needs a network with 2 x {c} output channels (prediction "
                             f"and variance), this one has {out.shape[-1]} (DiT: model.learn_sigma=True; "
                             f"UNet / MLP: leave model.out_channels / out_dim unset, or set it to {2 * c})")
        out, v = out[..., :c], out[..., c:]
    if prediction == "edm":  # D = c_skip x + c_out F (Karras et al. 2022, Eq. 7), VP frame
        c_skip_a, c_out, _, _ = edm_vp_coefficients(process.alpha(t), process.sigma(t), sigma_data)
        out = _bcast(c_skip_a, x_t) * x_t + _bcast(c_out, x_t) * out
    target = exact_target(prediction, x0, eps, t, process)
    mse = jnp.mean((out - target) ** 2, axis=tuple(range(1, x0.ndim)))
    w = loss_weight(weighting, prediction, t, process, min_snr_gamma=min_snr_gamma,
                    p2_gamma=p2_gamma, p2_k=p2_k, sigma_data=sigma_data)
    if not learned:
        return w * mse
    x0_hat = jax.lax.stop_gradient(out if prediction == "edm" else to_x0(prediction, out, x_t, t, process))
    vb = vlb_term(process, x0.astype(jnp.float32), x_t.astype(jnp.float32), t, x0_hat, v, bins=vlb_bins)
    return w * mse + (vlb_weight * process.num_train_timesteps) * vb
