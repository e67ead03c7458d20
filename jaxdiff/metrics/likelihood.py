"""Likelihood (bits/dim) through the probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through stochastic differential equations", Sec. 4.3 and Appendix D.2).

The probability-flow ODE of ``x_t = alpha(t) x0 + sigma(t) eps`` is written in the
variance-exploding frame ``y = x / alpha``, ``s = sigma / alpha`` (k-diffusion's sigma), where it is
the same for every process: ``dy/ds = (y - x0_hat(y, s)) / s``; with ``u = log s`` as the
integration variable,

    dy/du = g(y, u) = y - x0_hat(alpha(t) y, t),   t = process.t_from_sigma_ratio(e^u).

The instantaneous change of variables (Chen et al. 2018; Song et al. 2021, App. D.2) gives

    log p_{s_lo}(y_lo) = log p_prior(y_hi) + int_{u_lo}^{u_hi} div_y g(y(u), u) du,

with prior ``N(0, s_hi^2 I)`` (= the samplers' prior ``N(0, sigma(t_max)^2 I)`` in x). The
divergence is Hutchinson's estimator ``E_z[z^T (dg/dy) z]`` (Hutchinson 1989; Grathwohl et al.
2019), one probe ``z`` per example held fixed along the trajectory (one VJP per evaluation,
as Song et al.'s code), or the exact trace for small dimensions. The ODE for ``(y, log-det)`` is integrated
with classical RK4 on a uniform grid in ``u`` (``num_steps`` steps, 4 denoiser calls each);
Song et al. use RK45 with tolerances 1e-5 -- the test compares against the closed form on a
Gaussian target, where 100 steps reach ~1e-4 nats per dimension.

``y_lo = x0`` is evaluated at ``s_lo = max(sigma_ratio(t_min), 1e-3)`` (Song et al. evaluate at
t = 1e-5 for the same reason: the ODE is singular at s = 0), i.e. the likelihood of the data
blurred by N(0, s_lo^2) noise. ``s_hi = min(sigma_ratio(t_max), 1e3)`` (a rectified flow has
alpha(1) = 0).

:func:`bits_per_dim` adds uniform dequantization (Song et al. 2021, App. D.2; Ho et al. 2020 /
Theis et al. 2016): discrete data with ``levels`` values ``k`` (images in [-1, 1]) become
``(k + u) * 2 / levels - 1``, ``u ~ U[0, 1)^D``; bits/dim = ``-log p / (D ln 2) + log2(levels / 2)``
(= +7 for 8-bit images), an upper bound on the discrete negative log-likelihood in bits.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["log_likelihood", "bits_per_dim", "dequantize", "sigma_ratio_range"]

S_LO_MIN = 1e-3
S_HI_MAX = 1e3


def sigma_ratio_range(process) -> tuple[float, float]:
    """``(s_lo, s_hi)``: the VE-frame noise levels the likelihood ODE runs between."""
    with jax.ensure_compile_time_eval():  # concrete even when called under jit
        s_lo = float(process.sigma_ratio(jnp.float32(process.t_min)))
        s_hi = float(process.sigma_ratio(jnp.float32(process.t_max)))
    s_lo = s_lo if np.isfinite(s_lo) and s_lo > S_LO_MIN else S_LO_MIN
    s_hi = s_hi if np.isfinite(s_hi) and s_hi < S_HI_MAX else S_HI_MAX
    return s_lo, s_hi


def _sum_rest(a):
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def log_likelihood(denoise: Callable, process, x, key=None, *, num_steps: int = 100, exact_trace: bool = False,
                   probe: str = "rademacher", s_range: tuple[float, float] | None = None):
    """Log-density (nats) of each example of ``x`` (B, ...) under the PF-ODE model.

    Args:
      denoise: ``denoise(x, t) -> x0_hat`` (jaxdiff's denoiser interface; ``t`` a scalar).
      process: the forward process (``alpha``, ``sigma``, ``sigma_ratio``, ``t_from_sigma_ratio``).
      x: data (B, ...) in the model's scale.
      key: PRNG key for the Hutchinson probes (unused with ``exact_trace``).
      num_steps: RK4 steps in ``u = log s``.
      exact_trace: exact divergence (one VJP per dimension, reverse mode; small D only).
      probe: ``"rademacher"`` or ``"gaussian"`` Hutchinson probes.
      s_range: ``(s_lo, s_hi)``; default :func:`sigma_ratio_range`.

    Returns:
      ``(logp, y_hi)``: (B,) float32 log-densities and the latent at ``s_hi``.
    """
    x = jnp.asarray(x, jnp.float32)
    s_lo, s_hi = s_range or sigma_ratio_range(process)
    u_lo, u_hi = math.log(s_lo), math.log(s_hi)
    h = (u_hi - u_lo) / int(num_steps)
    d = int(np.prod(x.shape[1:]))

    def g(y, u):
        t = process.t_from_sigma_ratio(jnp.exp(u))
        a = process.alpha(t)
        return y - denoise(a * y, t)

    if exact_trace:
        basis = jnp.eye(d, dtype=jnp.float32).reshape((d, 1) + x.shape[1:])

        def div(y, u):
            gy, vjp_fn = jax.vjp(lambda yy: g(yy, u), y)
            rows = jax.vmap(lambda e: vjp_fn(jnp.broadcast_to(e, y.shape))[0])(basis)
            # rows[i] = e_i^T J (for every example); the trace sums the i-th component of row i
            diag = jnp.sum(rows.reshape(d, y.shape[0], d) * jnp.eye(d, dtype=jnp.float32)[:, None, :], axis=2)
            return gy, jnp.sum(diag, axis=0)
    else:
        if key is None:
            raise ValueError("the Hutchinson estimator needs a PRNG key (or exact_trace=True)")
        if probe == "rademacher":
            z = jax.random.rademacher(key, x.shape, jnp.float32)
        elif probe == "gaussian":
            z = jax.random.normal(key, x.shape, jnp.float32)
        else:
            raise ValueError(f"unknown probe {probe!r}; valid: rademacher, gaussian")

        def div(y, u):
            gy, vjp_fn = jax.vjp(lambda yy: g(yy, u), y)
            (zj,) = vjp_fn(z)  # z^T J: reverse mode (works through custom_vjp layers)
            return gy, _sum_rest(zj * z)

    def step(carry, i):
        y, logdet = carry
        u = u_lo + h * i
        k1, d1 = div(y, u)
        k2, d2 = div(y + 0.5 * h * k1, u + 0.5 * h)
        k3, d3 = div(y + 0.5 * h * k2, u + 0.5 * h)
        k4, d4 = div(y + h * k3, u + h)
        y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        logdet = logdet + (h / 6.0) * (d1 + 2.0 * d2 + 2.0 * d3 + d4)
        return (y, logdet), None

    init = (x, jnp.zeros((x.shape[0],), jnp.float32))
    (y_hi, logdet), _ = jax.lax.scan(step, init, jnp.arange(int(num_steps), dtype=jnp.float32))
    prior = -0.5 * _sum_rest(y_hi**2) / s_hi**2 - d * (math.log(s_hi) + 0.5 * math.log(2 * math.pi))
    return prior + logdet, y_hi


def dequantize(key, x, levels: int = 256):
    """Uniform dequantization of images in [-1, 1] with ``levels`` values ``k = round((x + 1) (levels - 1) / 2)``:
    ``(k + u) * 2 / levels - 1``, ``u ~ U[0, 1)``."""
    k = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 0.5 * (levels - 1))
    u = jax.random.uniform(key, x.shape, jnp.float32)
    return (k + u) * (2.0 / levels) - 1.0


def bits_per_dim(denoise: Callable, process, x, key, *, levels: int = 256, num_steps: int = 100,
                 exact_trace: bool = False, probe: str = "rademacher"):
    """Bits/dim of discrete images ``x`` (B, ...) in [-1, 1] with ``levels`` values per dimension
    (256 for 8-bit images, 17 for sklearn's digits): uniform dequantization, then
    ``-log p / (D ln 2) + log2(levels / 2)`` (Song et al. 2021, App. D.2). Returns (B,)."""
    k_deq, k_probe = jax.random.split(key)
    y = dequantize(k_deq, jnp.asarray(x, jnp.float32), levels)
    logp, _ = log_likelihood(denoise, process, y, k_probe, num_steps=num_steps, exact_trace=exact_trace,
                             probe=probe)
    d = int(np.prod(y.shape[1:]))
    return -logp / (d * math.log(2.0)) + math.log2(levels / 2.0)
