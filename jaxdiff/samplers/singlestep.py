"""Singlestep DPM-Solver-1/2/3 (Lu et al. 2022, "DPM-Solver", NeurIPS) and DPM-Solver++ (Lu et al.
2022b, the singlestep (2S) / (3S) solvers), as diffusers' ``DPMSolverSinglestepScheduler``.

How a singlestep solver runs on a :class:`~jaxdiff.schedules.Grid`
-------------------------------------------------------------------

A k-th order singlestep step from s to t evaluates the model at k - 1 intermediate points between
them. diffusers does not add points: it takes the intermediate points from the grid itself. Its
order plan (``get_order_list``) splits the N grid steps into consecutive groups, e.g.
``[1, 2, 3, 1, 2, 3, ...]`` for order 3; a group of size k that starts at grid point j is one
DPM-Solver-k step from t_j to t_{j+k} whose intermediate points are t_{j+1}, ..., t_{j+k-1}
(so r_1 = (lambda_{j+1} - lambda_j) / (lambda_{j+k} - lambda_j), r_2 likewise, with
lambda = log(alpha / sigma)). Inside a group, plan entry m (m = 1 .. k) evaluates the model at
t_{j+m-1} on the current state and moves to t_{j+m} with the order-m formula from the group start
x_j, i.e. the states at the intermediate points are the lower-order predictions the paper's
algorithms compute there (u_1 by DPM-Solver-1, u_2 by the order-2 formula through u_1), and the
state at the group end is the full order-k solution. N grid steps thus cost N model evaluations,
as for every other sampler, and the same Grid serves all samplers.

The plan (with ``lower_order_final``) is diffusers' for the grid's N. As in diffusers, a grid
ending at sigma = 0 (``final_sigmas_type="zero"``) always uses the ``lower_order_final`` plan and a
first-order last step (its log-SNR is infinite), and ``lower_order_final`` is forced when N is not
a multiple of ``order``. Steps whose stencil touches a point with alpha = 0 (a zero-terminal-SNR
start, lambda = -inf) are taken first order from the current state. A zero-length step (same
alpha and sigma at both ends, e.g. padding) leaves the state untouched.

Coefficients are written with phi-functions (:mod:`jaxdiff.samplers._phi`), e.g.
(e^-h - 1 + h) / h^2 = phi_2(-h), so fine grids keep full float32 accuracy; the first-order step
is DDIM, alpha' x0_hat + sigma' eps_hat, finite at alpha = 0 and into sigma = 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers._phi import log_snr_half, phi
from jaxdiff.samplers.base import run_steps, validate

ALGORITHMS = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


def order_plan(num_steps: int, order: int, lower_order_final: bool) -> np.ndarray:
    """diffusers' ``DPMSolverSinglestepScheduler.get_order_list`` (without the final-zero rule)."""
    n, k = int(num_steps), int(order)
    if k == 1:
        orders = [1] * n
    elif lower_order_final:
        if k == 3:
            if n % 3 == 0:
                orders = [1, 2, 3] * (n // 3 - 1) + [1, 2] + [1]
            elif n % 3 == 1:
                orders = [1, 2, 3] * (n // 3) + [1]
            else:
                orders = [1, 2, 3] * (n // 3) + [1, 2]
        else:
            orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1, 2, 3] * (n // 3) if k == 3 else [1, 2] * (n // 2)
    return np.asarray(orders[:n], np.int32)


def _check(name, value, valid):
    if value not in valid:
        raise ValueError(f"dpm_solver: unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def dpm_solver(denoise, x, grid, *, key=None, order: int = 2, algorithm: str = "dpmsolver++",
               solver_type: str = "midpoint", lower_order_final: bool = False):
    """Singlestep DPM-Solver-k (k = ``order`` in 1, 2, 3) on the grid's own points (module docstring).

    Args:
      denoise: ``denoise(x, t) -> x0_hat``.
      x: state at ``grid.t[0]``.
      grid: time grid; its points are both the step ends and the intermediate points.
      key: ignored (deterministic).
      order: 1 (DDIM), 2 (DPM-Solver-2 / ++(2S)) or 3 (DPM-Solver-3 / ++(3S)).
      algorithm: ``"dpmsolver++"`` (data prediction, Lu et al. 2022b) or ``"dpmsolver"``
        (noise prediction, Lu et al. 2022).
      solver_type: ``"midpoint"`` or ``"heun"``: diffusers' two variants of the order-2/3 formulas.
      lower_order_final: diffusers' plan option (forced for grids ending at sigma = 0, or when the
        number of steps is not a multiple of ``order``).

    ``dpm_solver.order`` is 2, the default ``order`` (diffusers' default ``solver_order``).
    """
    validate("dpm_solver", x, grid, key, stochastic=False)
    _check("order", order, (1, 2, 3))
    _check("algorithm", algorithm, ALGORITHMS)
    _check("solver_type", solver_type, SOLVER_TYPES)
    dtype = x.dtype
    plus = algorithm == "dpmsolver++"
    heun = solver_type == "heun"
    n = grid.t.shape[0] - 1
    forced = bool(lower_order_final) or n % order != 0
    plan = jnp.where(grid.sigma[-1] == 0, order_plan(n, order, True), order_plan(n, order, forced))
    lam = log_snr_half(grid.alpha, grid.sigma)
    alphas, sigmas = grid.alpha, grid.sigma

    def at(j):
        j = jnp.maximum(j, 0)
        return alphas[j], sigmas[j], lam[j]

    def step(carry, s):
        x, x_start, m1, m2 = carry
        xf = x.astype(jnp.float32)
        d = denoise(x, s.t).astype(jnp.float32)
        eps = (xf - s.alpha * d) / s.sigma
        m = d if plus else eps
        i = s.i
        _, _, lam_i = at(i)
        lam_t = lam[i + 1]
        a_t, s_t = s.alpha_next, s.sigma_next
        planned = plan[i]
        o = jnp.where((s_t == 0) | ~jnp.isfinite(lam_t), 1, planned)
        o = jnp.where((o == 2) & ~jnp.isfinite(at(i - 1)[2]), 1, o)
        o = jnp.where((o == 3) & ~(jnp.isfinite(at(i - 1)[2]) & jnp.isfinite(at(i - 2)[2])), 1, o)

        def first(_):
            return a_t * d + s_t * eps

        def second(_):
            a_a, s_a, lam_a = at(i - 1)
            h = lam_t - lam_a
            r0 = (lam_i - lam_a) / h
            d0, d1 = m1, (m - m1) / r0
            if plus:
                base = (s_t / s_a) * x_start - a_t * jnp.expm1(-h) * d0
                corr = a_t * h * phi(2, -h) if heun else -0.5 * a_t * jnp.expm1(-h)
            else:
                base = (a_t / a_a) * x_start - s_t * jnp.expm1(h) * d0
                corr = -s_t * h * phi(2, h) if heun else -0.5 * s_t * jnp.expm1(h)
            return base + corr * d1

        def third(_):
            a_a, s_a, lam_a = at(i - 2)
            lam_1 = at(i - 1)[2]
            h = lam_t - lam_a
            r0, r1 = (lam_i - lam_a) / h, (lam_1 - lam_a) / h
            d0 = m2
            d1_0, d1_1 = (m1 - m2) / r1, (m - m2) / r0
            if plus:
                base = (s_t / s_a) * x_start - a_t * jnp.expm1(-h) * d0
                c1, c2 = a_t * h * phi(2, -h), a_t * h * phi(3, -h)
            else:
                base = (a_t / a_a) * x_start - s_t * jnp.expm1(h) * d0
                c1, c2 = -s_t * h * phi(2, h), -s_t * h * phi(3, h)
            if not heun:
                return base + c1 * d1_1
            d1 = (r0 * d1_0 - r1 * d1_1) / (r0 - r1)
            d2 = 2.0 * (d1_1 - d1_0) / (r0 - r1)
            return base + c1 * d1 + c2 * d2

        x_next = jax.lax.switch(jnp.clip(o - 1, 0, order - 1), [first, second, third][:order], None)
        x_start = jnp.where(planned == 1, xf, x_start)
        new = (x_next.astype(dtype), x_start, m, m1)
        skip = (s.alpha_next == s.alpha) & (s.sigma_next == s.sigma)  # zero-length step: a no-op
        return jax.tree_util.tree_map(lambda a, b: jnp.where(skip, a, b), carry, new)

    zeros = jnp.zeros(x.shape, jnp.float32)
    x_end, _, _, _ = run_steps(step, (x, zeros, zeros, zeros), grid, key)
    return x_end


dpm_solver.order = 2
dpm_solver.stochastic = False

__all__ = ["dpm_solver", "order_plan"]
