"""phi-functions of exponential integrators, evaluated without cancellation (private helper).

phi_k(z) = sum_{n >= 0} z^n / (n + k)!, so phi_1(z) = (e^z - 1) / z and
phi_{k+1}(z) = (phi_k(z) - 1/k!) / z (Hochbruck & Ostermann 2010). The recursion loses about
log10(k! / |z|^k) digits for small |z|, which is where fine grids live (DPM-Solver, UniPC and DEIS
coefficients like (e^-h - 1 + h) / h^2); below |z| = 2 the Taylor series is used instead.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

_SERIES_BELOW = 2.0
_TERMS = 22  # 2^22 / 22! ~ 4e-15: series exact in float32 on |z| <= 2


def phi(k: int, z):
    """phi_k(z) for k >= 1 (float32; z may be any finite value, +-inf gives the limit)."""
    z = jnp.asarray(z, jnp.float32)
    small = jnp.abs(z) < _SERIES_BELOW
    zs = jnp.where(small, z, 0.0)
    # Horner on sum_n z^n / (n + k)!
    acc = jnp.full_like(zs, 1.0 / math.factorial(_TERMS - 1 + k))
    for n in range(_TERMS - 2, -1, -1):
        acc = acc * zs + 1.0 / math.factorial(n + k)
    zl = jnp.where(small, 1.0, z)
    big = jnp.expm1(zl) / zl
    for j in range(1, k):
        big = (big - 1.0 / math.factorial(j)) / zl
    return jnp.where(small, acc, big)


def log_snr_half(alpha, sigma):
    """lambda = log(alpha / sigma): -inf where alpha = 0, +inf where sigma = 0."""
    return jnp.log(alpha) - jnp.log(sigma)
