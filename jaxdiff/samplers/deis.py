"""DEIS: diffusion exponential integrator sampler (Zhang & Chen 2023, "Fast Sampling of Diffusion
Models with Exponential Integrator", ICLR), the multistep "rho AB" variant with polynomial
extrapolation in log rho that diffusers' ``DEISMultistepScheduler`` implements
(``algorithm_type="deis"``, ``solver_type="logrho"``).

In the variance-exploding frame x~ = x / alpha, rho = sigma / alpha the probability-flow ODE is
d x~ / d rho = eps_hat(x, t) exactly, so

    x~(rho_t) = x~(rho_s) + integral_{rho_s}^{rho_t} eps_hat d rho.

DEIS-k interpolates eps_hat through the current and k - 1 previous evaluations with a polynomial
in log rho (diffusers' ``ind_fn`` Lagrange integrals) and integrates it exactly. Here the polynomial
is in Newton form in v = log(rho / rho_s) and the integrals
J_k = integral_0^H v^k e^v dv, H = log(rho_t / rho_s), are written with phi-functions
(J_1 = H^2 (phi_1 - phi_2), J_2 = H^3 (phi_1 - 2 phi_2 + 2 phi_3) at H), so fine grids keep
float32 accuracy where the Lagrange form cancels:

    x_t = alpha_t x0_hat + sigma_t eps_hat + alpha_t rho_s (J_1 d_1 + (J_2 - v_1 J_1) d_2),

with d_1, d_2 the divided differences of eps_hat over the nodes 0, v_1, v_2. The first-order step is
DDIM (alpha_t x0_hat + sigma_t eps_hat), finite from alpha = 0 and into sigma = 0.

Plan (diffusers): order 1 at step 0, at most 2 at step 1, then ``order``; with
``lower_order_final`` and fewer than 15 steps the last step is first and the one before second
order. Into sigma = 0 (log rho = -inf) the step is first order; stencils touching alpha = 0
(log rho = +inf) drop to a lower order; a zero-length step leaves the state untouched.
diffusers' own grid ends at the last training time (``final`` point t = 0, sigma_min), not at 0.

``deis.order`` is 2, the default ``order`` (diffusers' default ``solver_order``). The first
(warm-up) steps are lower order; their local errors are O(h^2) and O(h^3), so DEIS-3's global
error is asymptotically O(h^2) unless they are negligible (they are small at high noise, where
eps_hat varies slowly).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers._phi import phi
from jaxdiff.samplers.base import run_steps, validate


def deis_plan(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
    """diffusers' DEISMultistepScheduler.step order choice for each of the N steps."""
    n = int(num_steps)
    lof = bool(lower_order_final) and n < 15
    plan = []
    for i in range(n):
        if order == 1 or i < 1 or (lof and i == n - 1):
            plan.append(1)
        elif order == 2 or i < 2 or (lof and i == n - 2):
            plan.append(2)
        else:
            plan.append(3)
    return np.asarray(plan, np.int32)


def deis(denoise, x, grid, *, key=None, order: int = 2, lower_order_final: bool = True):
    """DEIS-k rho AB (k = ``order`` in 1, 2, 3) on ``grid`` (module docstring).

    Args:
      denoise: ``denoise(x, t) -> x0_hat``.
      x: state at ``grid.t[0]``.
      grid: time grid (:class:`jaxdiff.schedules.Grid`).
      key: ignored (deterministic).
      order: 1 (DDIM), 2 or 3.
      lower_order_final: diffusers' option (only acts when N < 15).
    """
    validate("deis", x, grid, key, stochastic=False)
    if order not in (1, 2, 3):
        raise ValueError(f"deis: order must be 1, 2 or 3, got {order!r}")
    dtype = x.dtype
    n = grid.t.shape[0] - 1
    plan = jnp.asarray(deis_plan(n, order, lower_order_final))
    log_rho = jnp.log(grid.sigma) - jnp.log(grid.alpha)  # -inf at sigma = 0, +inf at alpha = 0

    def u_at(j):
        return log_rho[jnp.maximum(j, 0)]

    def step(carry, s):
        x, e1, e2 = carry  # eps_hat at t_{i-1}, t_{i-2}
        i = s.i
        xf = x.astype(jnp.float32)
        d = denoise(x, s.t).astype(jnp.float32)
        e0 = (xf - s.alpha * d) / s.sigma
        u_s, u_t = log_rho[i], log_rho[i + 1]
        p = plan[i]
        p = jnp.where((p == 3) & ~jnp.isfinite(u_at(i - 2)), 2, p)
        p = jnp.where((p >= 2) & ~jnp.isfinite(u_at(i - 1)), 1, p)
        p = jnp.where((s.sigma_next == 0) | ~jnp.isfinite(u_t) | ~jnp.isfinite(u_s), 1, p)
        ddim = s.alpha_next * d + s.sigma_next * e0

        def first(_):
            return ddim

        def higher(k):
            def f(_):
                hh = u_t - u_s
                p1, p2 = phi(1, hh), phi(2, hh)
                v1 = u_at(i - 1) - u_s
                d1 = (e1 - e0) / v1
                j1 = hh**2 * (p1 - p2)
                corr = j1 * d1
                if k == 3:
                    v2 = u_at(i - 2) - u_s
                    d2 = ((e2 - e1) / (v2 - v1) - d1) / v2
                    j2 = hh**3 * (p1 - 2.0 * p2 + 2.0 * phi(3, hh))
                    corr = corr + (j2 - v1 * j1) * d2
                return ddim + (s.alpha_next * s.sigma / s.alpha) * corr

            return f

        branches = [first] + [higher(k) for k in range(2, order + 1)]
        x_next = jax.lax.switch(jnp.clip(p - 1, 0, order - 1), branches, None)
        new = (x_next.astype(dtype), e0, e1)
        skip = (s.alpha_next == s.alpha) & (s.sigma_next == s.sigma)  # zero-length step: a no-op
        return jax.tree_util.tree_map(lambda a, b: jnp.where(skip, a, b), carry, new)

    zeros = jnp.zeros(x.shape, jnp.float32)
    x_end, _, _ = run_steps(step, (x, zeros, zeros), grid, key)
    return x_end


deis.order = 2
deis.stochastic = False

__all__ = ["deis", "deis_plan"]
