"""UniPC: unified predictor-corrector (Zhao et al. 2023, "UniPC", NeurIPS), as diffusers'
``UniPCMultistepScheduler`` with ``predict_x0=True`` (data prediction).

Each step i evaluates the model once, at the predicted state x_i:

1. UniC-p (corrector): unless disabled, x_i is corrected with the multistep formula of the
   previous step's order p, now including the fresh evaluation m_i at x_i itself -- no extra
   model call; the corrected x_i is the state the next step starts from;
2. UniP-p (predictor): a multistep exponential-integrator step of order p from the corrected x_i
   to t_{i+1}, using m_i and the p - 1 previous evaluations.

``variant`` picks B(h): ``"bh1"`` is B(h) = h, ``"bh2"`` is B(h) = e^h - 1 (paper, Sec. 3.3; h is
the step in lambda = log(alpha / sigma), here with the sign of data prediction). The predictor of
order 2 uses rho = 1/2 and the order-1 corrector rho_c = 1/2, as the paper's
implementation and diffusers do; other orders solve the paper's Vandermonde system R rho = b(h)
with b_k = k! phi_{k+1}(-h) h / B(h) (phi-functions: :mod:`jaxdiff.samplers._phi`).

Plan: the predictor order at step i is min(order, i + 1, N - i) with ``lower_order_final``
(diffusers' default), else min(order, i + 1); the last step is never corrected (nothing is
evaluated after it). Into sigma = 0 the predictor is first order: x_N = x0_hat (diffusers'
``final_sigmas_type="zero"``). Stencils touching a point with alpha = 0 (lambda = -inf) drop to a
lower order (an order-1 bh1 corrector there is skipped: B(h) = h is infinite); diffusers instead
replaces alpha^2 = 0 by 2^-24. A zero-length step leaves the state untouched.

Accuracy: UniC-p raises the order of UniP-p by one, to p + 1 (paper, Theorem 3.1), when every
step uses the same p -- i.e. with ``lower_order_final=False`` and a grid not ending at sigma = 0
(otherwise the first-order last step caps the order at 2). ``unipc.order`` is 2, the default
``order`` option (the predictor order p; diffusers' default ``solver_order``).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers._phi import log_snr_half, phi
from jaxdiff.samplers.base import run_steps, validate

VARIANTS = ("bh1", "bh2")


def _b(q, hh, bh1):
    """b_k = k! phi_{k+1}(hh) hh / B(hh), k = 1 .. q (B = hh or e^hh - 1)."""
    den = 1.0 if bh1 else phi(1, hh)
    return jnp.stack([math.factorial(k) * phi(k + 1, hh) / den for k in range(1, q + 1)])


def _vandermonde(rks):
    """R[k, j] = rks[j]^k."""
    return jnp.stack([rks**k for k in range(rks.shape[0])])


def unipc(denoise, x, grid, *, key=None, order: int = 2, variant: str = "bh2",
          lower_order_final: bool = True, disable_corrector: Sequence[int] = ()):
    """UniPC-p (p = ``order`` in 1, 2, 3) with data prediction (module docstring).

    Args:
      denoise: ``denoise(x, t) -> x0_hat``.
      x: state at ``grid.t[0]``.
      grid: time grid (:class:`jaxdiff.schedules.Grid`).
      key: ignored (deterministic).
      order: predictor order p (the corrected method has order p + 1).
      variant: ``"bh2"`` (default, as diffusers) or ``"bh1"``.
      lower_order_final: lower the predictor order over the last steps (diffusers' default True).
      disable_corrector: step indices i whose result is not corrected (diffusers' list: the
        corrector applied at step i + 1 to the state step i predicted).
    """
    validate("unipc", x, grid, key, stochastic=False)
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order must be 1, 2 or 3, got {order!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unipc: unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    bh1 = variant == "bh1"
    dtype = x.dtype
    n = grid.t.shape[0] - 1
    idx = np.arange(n)
    plan = np.minimum(order, idx + 1)
    if lower_order_final:
        plan = np.minimum(plan, n - idx)
    disabled = {int(j) for j in disable_corrector}
    use_c = jnp.asarray([i > 0 and (i - 1) not in disabled for i in range(n)])
    plan = jnp.asarray(plan, jnp.int32)
    lam = log_snr_half(grid.alpha, grid.sigma)
    alphas, sigmas = grid.alpha, grid.sigma

    def lam_at(j):
        return lam[jnp.maximum(j, 0)]

    def fin(v):
        return jnp.isfinite(v)

    def update(q, predictor, x_s, a_s, s_s, a_t, s_t, lam_s, lam_t, m0, hist_lams, hist_ms, m_t=None):
        """The state at t from x_s at s: exponential-integrator base (DDIM with the data prediction
        m0 at s) + the B(h) correction of order q (UniP-q, or UniC-q with the evaluation m_t at t)."""
        ratio = s_t / s_s
        c = a_t - a_s * ratio  # = -alpha_t (e^-h - 1)
        base = ratio * x_s + c * m0
        if q == 1 and predictor:
            return base
        h = lam_t - lam_s
        a_bh = -a_t * h if bh1 else -c  # alpha_t B(h), B with the data-prediction sign
        if q == 1:  # corrector, rho_c = 1/2
            return base - a_bh * 0.5 * (m_t - m0)
        rks = [(hist_lams[k] - lam_s) / h for k in range(q - 1)]
        d1s = [(hist_ms[k] - m0) / rks[k] for k in range(q - 1)]
        hh = -h
        if predictor:
            if q == 2:
                rhos = jnp.full((1,), 0.5, h.dtype)  # not a float64 constant under jax_enable_x64
            else:
                rhos = jnp.linalg.solve(_vandermonde(jnp.stack(rks)), _b(q, hh, bh1)[:-1])
            res = sum(rhos[k] * d1s[k] for k in range(q - 1))
        else:
            rks_c = jnp.stack(rks + [jnp.ones_like(h)])
            rhos = jnp.linalg.solve(_vandermonde(rks_c), _b(q, hh, bh1))
            res = sum(rhos[k] * d1s[k] for k in range(q - 1)) + rhos[q - 1] * (m_t - m0)
        return base - a_bh * res

    def step(carry, s):
        x, x_prev, hist, p_prev = carry  # hist: m_{i-1}, m_{i-2}, m_{i-3}
        i = s.i
        m = denoise(x, s.t).astype(jnp.float32)
        xf = x.astype(jnp.float32)

        # --- corrector: x_prev at t_{i-1} -> t_i, order p_prev, with m_i at the predicted x_i.
        a_s, s_s, lam_s = alphas[jnp.maximum(i - 1, 0)], sigmas[jnp.maximum(i - 1, 0)], lam_at(i - 1)
        lam_i = lam[i]
        q = jnp.where((p_prev == 3) & ~fin(lam_at(i - 3)), 2, p_prev)
        q = jnp.where((q >= 2) & ~fin(lam_at(i - 2)), 1, q)
        q = jnp.where(~fin(lam_i - lam_s), 1, q)
        correct = use_c[i] & ~(bh1 & ~fin(lam_i - lam_s))
        hist_lams_c = (lam_at(i - 2), lam_at(i - 3))

        def corr(qq):
            return lambda _: update(qq, False, x_prev, a_s, s_s, s.alpha, s.sigma, lam_s, lam_i,
                                    hist[0], hist_lams_c, (hist[1], hist[2]), m_t=m)

        x_c = jax.lax.switch(jnp.clip(q - 1, 0, order - 1), [corr(k) for k in range(1, order + 1)], None)
        xf = jnp.where(correct, x_c, xf)

        # --- predictor: corrected x_i -> t_{i+1}, order p.
        lam_t = lam[i + 1]
        p = plan[i]
        p = jnp.where((p == 3) & ~fin(lam_at(i - 2)), 2, p)
        p = jnp.where((p >= 2) & ~fin(lam_at(i - 1)), 1, p)
        p = jnp.where((s.sigma_next == 0) | ~fin(lam_t - lam_i), 1, p)
        hist_lams_p = (lam_at(i - 1), lam_at(i - 2))

        def pred(pp):
            return lambda _: update(pp, True, xf, s.alpha, s.sigma, s.alpha_next, s.sigma_next, lam_i, lam_t,
                                    m, hist_lams_p, (hist[0], hist[1]))

        x_next = jax.lax.switch(jnp.clip(p - 1, 0, order - 1), [pred(k) for k in range(1, order + 1)], None)
        new = (x_next.astype(dtype), xf, jnp.stack([m, hist[0], hist[1]]), p)
        skip = (s.alpha_next == s.alpha) & (s.sigma_next == s.sigma)  # zero-length step: a no-op
        return jax.tree_util.tree_map(lambda a, b: jnp.where(skip, a, b), carry, new)

    init = (x, jnp.zeros(x.shape, jnp.float32), jnp.zeros((3,) + x.shape, jnp.float32), jnp.ones((), jnp.int32))
    x_end, _, _, _ = run_steps(step, init, grid, key)
    return x_end


unipc.order = 2
unipc.stochastic = False

__all__ = ["unipc"]
