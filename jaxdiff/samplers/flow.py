"""Flow-matching Euler and Heun in the velocity form (rectified flow; Liu et al. 2023, "Flow
Straight and Fast"; Lipman et al. 2023, "Flow Matching for Generative Modeling"; Esser et al.
2024, "Scaling Rectified Flow Transformers", Sec. 2 -- the samplers of diffusers'
``FlowMatchEulerDiscreteScheduler`` and ``FlowMatchHeunDiscreteScheduler``).

With the velocity ``v = dx_t/dt = alpha'(t) x0_hat + sigma'(t) eps_hat`` (eps_hat =
(x - alpha x0_hat) / sigma; for :class:`~jaxdiff.processes.RectifiedFlow`, alpha = 1 - t and
sigma = t, it is eps_hat - x0_hat), a step from t to t' is

    Euler:  x' = x + (t' - t) v(x, t)
    Heun:   x~ = x + (t' - t) v(x, t),   x' = x + (t' - t) (v(x, t) + v(x~, t')) / 2.

These are Euler / Heun in the process time t for any process; on rectified flow they are the same
steps as :func:`~jaxdiff.samplers.euler` (DDIM form alpha' x0_hat + sigma' eps_hat, algebraically
equal there) and :func:`~jaxdiff.samplers.heun` (which integrates flows in t), and the tests check
that to 1e-6. The step into sigma = 0 is the Euler step, and there v = (x - x0_hat) / t makes it
land on x0_hat; on a grid whose clean end point is not the process's value at t' (discrete chains,
whose appended clean point is beyond t = 0) it returns x0_hat, the point the grid names. Heun
cannot evaluate v at sigma = 0 from a denoiser (eps_hat = 0 / 0), so its last step into sigma = 0
is Euler: N steps cost 2N - 1 model calls, where diffusers' FlowMatchHeun evaluates a velocity
network at t = 0 as well (2N calls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import run_steps, validate

__all__ = ["flow_euler", "flow_heun"]


def _velocity(denoise, process, dtype, x, t, alpha, sigma):
    """(v, x0_hat) at (x, t): v = alpha'(t) x0_hat + sigma'(t) (x - alpha x0_hat) / sigma."""
    x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
    da, ds = process.derivatives(t)
    return da * x0 + ds * (x - alpha * x0) / sigma, x0


def flow_euler(denoise, x, grid, *, key=None):
    """Euler in the velocity form, x' = x + (t' - t) v (diffusers ``FlowMatchEulerDiscreteScheduler``
    with ``stochastic_sampling=False``). N steps, N model calls. See the module docstring."""
    validate("flow_euler", x, grid, key, stochastic=False)
    dtype, process = x.dtype, grid.process

    def step(x, s):
        x = x.astype(jnp.float32)
        v, x0 = _velocity(denoise, process, dtype, x, s.t, s.alpha, s.sigma)
        x_next = x + (s.t_next - s.t) * v
        return jnp.where(s.sigma_next == 0, x0, x_next).astype(dtype)

    return run_steps(step, x, grid, key)


flow_euler.order = 1
flow_euler.stochastic = False


def flow_heun(denoise, x, grid, *, key=None):
    """Heun (explicit trapezoid) in the velocity form (diffusers ``FlowMatchHeunDiscreteScheduler``);
    the step into sigma = 0 is Euler. N steps, 2N - 1 model calls on a grid ending at sigma = 0
    (2N otherwise). See the module docstring."""
    validate("flow_heun", x, grid, key, stochastic=False)
    dtype, process = x.dtype, grid.process

    def step(x, s):
        x = x.astype(jnp.float32)
        v, x0 = _velocity(denoise, process, dtype, x, s.t, s.alpha, s.sigma)
        dt = s.t_next - s.t
        x_euler = x + dt * v

        def correct(_):
            v2, _ = _velocity(denoise, process, dtype, x_euler, s.t_next, s.alpha_next, s.sigma_next)
            return x + dt * 0.5 * (v + v2)

        final = s.sigma_next == 0
        return jax.lax.cond(final, lambda _: x0, correct, None).astype(dtype)

    return run_steps(step, x, grid, key)


flow_heun.order = 2
flow_heun.stochastic = False
