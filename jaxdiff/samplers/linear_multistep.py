"""Linear multistep samplers on the probability-flow ODE in the variance-exploding frame.

* :func:`lms` -- k-diffusion's ``sample_lms``: variable-step Adams-Bashforth in s = sigma / alpha,
  each coefficient the integral over the step of a Lagrange basis polynomial through the last
  ``order`` noise levels. k-diffusion integrates with ``scipy.integrate.quad``; here a fixed
  Gauss-Legendre rule with ceil(order / 2) nodes, exact for those polynomials (degree order - 1),
  runs inside the scan.
* :func:`ipndm` -- iPNDM (Zhang & Chen 2023, "DEIS"; the zju-pi/diff-sampler version adopted by
  ComfyUI's k-diffusion as ``sample_ipndm``): the *fixed* Adams-Bashforth coefficients of orders
  1..4 on whatever grid is given, with lower orders during warm-up.
* :func:`ipndm_v` -- ``sample_ipndm_v``: the same with zju-pi's step-size-dependent coefficients.

In the VE frame (x~ = x / alpha) the slope is dx~/ds = eps_hat = (x - alpha x0_hat) / sigma and a
step is x~' = x~ + (s' - s) sum_j b_j eps_{i-j}. Written in (alpha, sigma) coordinates,

    x' = alpha' x0_hat + sigma' eps_i + alpha' (s' - s) [sum_j b_j (eps_{i-j} - eps_i) + (sum_j b_j - 1) eps_i],

which is finite where alpha = 0: there s = inf, and that step (the first of a zero-terminal-SNR
grid) is Euler; history across it is not used (the order restarts after it).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import run_steps, safe_div, validate

__all__ = ["lms", "ipndm", "ipndm_v"]


def _lms_coeffs(order, nodes, s_next):
    """Normalised LMS weights b^(k)_j = (1/h) int_{s0}^{s1} l^(k)_j(tau) dtau for every k = 1..order.

    ``nodes[m]`` is s_{i-m}; returns a list (by k) of lists of scalars b^(k)_0..b^(k)_{k-1}.
    """
    u, w = np.polynomial.legendre.leggauss(max(1, math.ceil(order / 2)))
    u, w = (u + 1.0) / 2.0, w / 2.0  # nodes / weights on [0, 1]
    s0 = nodes[0]
    h = s_next - s0
    taus = [s0 + h * float(uq) for uq in u]
    out = []
    for k in range(1, order + 1):
        bs = []
        for j in range(k):
            acc = 0.0
            for tau, wq in zip(taus, w):
                prod = 1.0
                for m in range(k):
                    if m != j:
                        prod = prod * safe_div(tau - nodes[m], nodes[j] - nodes[m])
                acc = acc + float(wq) * prod
            bs.append(acc)
        out.append(bs)
    return out


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


def _ipndm_fixed(order, nodes, s_next):
    return [[jnp.float32(b) for b in _AB[k]] for k in range(1, order + 1)]


def _ipndm_variable(order, nodes, s_next):
    """zju-pi's iPNDM_v coefficients (transcribed from ``sample_ipndm_v``), for k = 1..order."""
    h_n = s_next - nodes[0]
    hs = [nodes[m] - nodes[m + 1] for m in range(order - 1)]  # h_n_1, h_n_2, h_n_3
    d = safe_div
    out = [[jnp.float32(1.0)]]
    if order >= 2:
        h_n_1 = hs[0]
        out.append([(2 + d(h_n, h_n_1)) / 2, -d(h_n, h_n_1) / 2])
    if order >= 3:
        h_n_2 = hs[1]
        temp = (1 - d(d(h_n, 3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)), h_n_1 * (h_n_1 + h_n_2))) / 2
        out.append([
            (2 + d(h_n, h_n_1)) / 2 + temp,
            -d(h_n, h_n_1) / 2 - (1 + d(h_n_1, h_n_2)) * temp,
            temp * d(h_n_1, h_n_2),
        ])
    if order >= 4:
        h_n_3 = hs[2]
        temp1 = (1 - d(d(h_n, 3 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)), h_n_1 * (h_n_1 + h_n_2))) / 2
        temp2 = ((1 - d(h_n, 3 * (h_n + h_n_1))) / 2 + d((1 - d(h_n, 2 * (h_n + h_n_1))) * h_n,
                                                          6 * (h_n + h_n_1 + h_n_2))) \
            * d(h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2), h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3))
        g = d(h_n_1 * (h_n_1 + h_n_2), h_n_2 * (h_n_2 + h_n_3))
        out.append([
            (2 + d(h_n, h_n_1)) / 2 + temp1 + temp2,
            -d(h_n, h_n_1) / 2 - (1 + d(h_n_1, h_n_2)) * temp1 - (1 + d(h_n_1, h_n_2) + g) * temp2,
            temp1 * d(h_n_1, h_n_2) + (d(h_n_1, h_n_2) + g * (1 + d(h_n_2, h_n_3))) * temp2,
            -temp2 * g * d(h_n_1, h_n_2),
        ])
    return out


def _multistep(name, coeff_fn, denoise, x, grid, key, order, denoise_last):
    if not (isinstance(order, int) and order >= 1):
        raise ValueError(f"{name}: order must be a positive int, got {order!r}")
    validate(name, x, grid, key, stochastic=False)
    dtype = x.dtype
    m = max(order - 1, 1)

    def step(carry, s):
        x, eps_hist, s_hist, n_valid = carry
        x = x.astype(jnp.float32)
        d = denoise(x.astype(dtype), s.t).astype(jnp.float32)
        eps = (x - s.alpha * d) / s.sigma
        finite = s.alpha > 0
        s_cur = jnp.where(finite, safe_div(s.sigma, s.alpha), 1.0)
        s_next = safe_div(s.sigma_next, s.alpha_next)
        n_valid = jnp.where(finite, jnp.minimum(n_valid + 1, order), 0)
        cur = jnp.maximum(n_valid, 1)

        nodes = [s_cur] + [s_hist[j] for j in range(order - 1)]
        table = coeff_fn(order, nodes, s_next)
        b = [jnp.float32(0.0)] * order  # the weights of the current order, selected from the table
        for k in range(1, order + 1):
            for j in range(k):
                b[j] = b[j] + jnp.where(cur == k, table[k - 1][j], 0.0)
        incr = (sum(b) - 1.0) * eps
        for j in range(1, order):
            incr = incr + b[j] * (eps_hist[j - 1] - eps)
        dt = jnp.where(finite, s.sigma_next - s.alpha_next * s_cur, 0.0)  # alpha' (s' - s)
        out = s.alpha_next * d + s.sigma_next * eps + dt * incr
        if denoise_last:
            out = jnp.where(s.sigma_next == 0, d, out)
        eps_hist = jnp.concatenate([eps[None], eps_hist[:-1]], axis=0)
        s_hist = jnp.concatenate([s_cur[None], s_hist[:-1]], axis=0)
        return (out.astype(dtype), eps_hist, s_hist, n_valid)

    init = (x, jnp.zeros((m,) + x.shape, jnp.float32), jnp.zeros((m,), jnp.float32), jnp.zeros((), jnp.int32))
    return run_steps(step, init, grid, key)[0]


def lms(denoise, x, grid, *, key=None, order: int = 4):
    """Linear multistep (k-diffusion ``sample_lms``), orders 1..``order`` during warm-up.

    Every step, the step into sigma = 0 included, is the multistep update (as k-diffusion's).
    """
    return _multistep("lms", _lms_coeffs, denoise, x, grid, key, order, denoise_last=False)


lms.order = 4
lms.stochastic = False


def ipndm(denoise, x, grid, *, key=None, max_order: int = 4):
    """iPNDM (``sample_ipndm``): fixed Adams-Bashforth weights of order min(i + 1, max_order) <= 4;
    the step into sigma = 0 returns x0_hat.

    The fixed weights assume equal steps: on a smoothly varying grid (Karras) the method is
    second order asymptotically, though with a small error constant.
    """
    if max_order not in _AB:
        raise ValueError(f"ipndm: max_order must be 1..4, got {max_order!r}")
    return _multistep("ipndm", _ipndm_fixed, denoise, x, grid, key, max_order, denoise_last=True)


ipndm.order = 2
ipndm.stochastic = False


def ipndm_v(denoise, x, grid, *, key=None, max_order: int = 4):
    """iPNDM_v (``sample_ipndm_v``): iPNDM with zju-pi's step-size-dependent weights; the step into
    sigma = 0 returns x0_hat.

    ``order`` is 2: the order-2 weights are variable-step AB2 (= ``lms(order=2)``) and the order-3
    ones are third order, but the order-4 weights (the default) sum to 1 only up to O(change of the
    step ratio ^ 2), so on Karras grids the error stalls near N = 40-80 and then decays at about
    second order. ``max_order=3`` converges at third order.
    """
    if max_order not in _AB:
        raise ValueError(f"ipndm_v: max_order must be 1..4, got {max_order!r}")
    return _multistep("ipndm_v", _ipndm_variable, denoise, x, grid, key, max_order, denoise_last=True)


ipndm_v.order = 2
ipndm_v.stochastic = False
