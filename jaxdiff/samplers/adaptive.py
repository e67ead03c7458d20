"""Adaptive probability-flow ODE solver: Dormand-Prince 5(4) with error control.

The PF-ODE (Song et al. 2021, Eq. 13) of ``x_t = alpha(t) x0 + sigma(t) eps`` in process time is

    dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat,    eps_hat = (x - alpha x0_hat) / sigma,

(the velocity of flow matching), finite where alpha = 0. It is integrated with the explicit
Runge-Kutta pair of Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae",
J. Comp. Appl. Math. 6(1) (Hairer, Norsett & Wanner, "Solving ODEs I", Table II.5.2): 7 stages,
first-same-as-last, so an accepted or rejected step costs 6 model calls. The error of the 5th-order
solution is estimated by the embedded 4th-order one and measured in Hairer's RMS norm
``sqrt(mean((err / (atol + rtol max(|x|, |x_new|)))^2))`` over the whole state (one step size for
the batch; ``jax.vmap`` gives one per lane). A step is accepted when the norm is <= 1; the next step
size is ``h * clip(safety err^(-1/5 + 0.75 beta) err_prev^beta, 1/5, 10)`` (Hairer II, Sec. IV.2,
Eq. 2.43c; ``controller="pi"``, beta = 0.04 as in Hairer's ``dopri5``) or ``beta = 0``
(``controller="standard"``, Hairer I, Eq. II.4.13). The first step size is chosen by Hairer I,
Sec. II.4 ("Starting Step Size", one extra model call).

The loop is a ``jax.lax.while_loop`` (so ``jit`` and ``vmap`` work, and forward-mode ``jax.jvp``
when the denoiser supports it: jaxdiff's UNet on CPU does under :func:`jaxdiff.compile_options.jit`
or with ``conv_impl="xla"``, see :mod:`jaxdiff.nets.conv`);
reverse-mode ``jax.grad`` cannot go through a while loop, so ``differentiable=True`` runs the same
step body in a ``lax.scan`` of ``max_steps`` iterations that skips the finished ones. The step-size
controller is not differentiated (``stop_gradient`` on the error norm): the gradient is that of
the solution on the accepted mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.samplers.base import validate

__all__ = ["pf_ode_adaptive", "DOPRI5"]

# Dormand-Prince 5(4): nodes c, stage matrix a (row i: stage i + 1), 5th-order weights b (= last
# row, FSAL) and the error weights e = b - b_hat (b_hat: the embedded 4th-order solution).
DOPRI5 = dict(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    e=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
)

_CONTROLLERS = {"pi": 0.04, "standard": 0.0}


def pf_ode_adaptive(denoise, x, grid, *, key=None, rtol: float = 1e-3, atol: float = 1e-4,
                    controller: str = "pi", safety: float = 0.9, max_steps: int = 1000,
                    differentiable: bool = False, return_nfe: bool = False):
    """Probability-flow ODE with adaptive Dormand-Prince 5(4) steps (see the module docstring).

    Integrates from ``grid.t[0]`` to ``grid.t[-1]``; the points in between are not used. If the grid
    ends at sigma = 0 (the clean point every ``make_grid`` grid appends), the ODE is integrated to
    the point before it, ``grid.t[-2]``, and the last step is the Euler step into sigma = 0,
    x = x0_hat, as in every other sampler (the ODE's velocity needs eps_hat = (x - alpha x0_hat) /
    sigma, 0 / 0 at sigma = 0). So pass ``schedules.grid_from_times(process, [t_start, t_end])``
    (t_end > 0 the last noisy time, then the clean point) or ``final="last"`` to stop at t_end.

    Args:
      denoise, x, grid, key: the shared sampler signature (``key`` is unused).
      rtol, atol: relative and absolute tolerances of the local error (float32 state: rtol >= 1e-6).
      controller: ``"pi"`` (Hairer's dopri5 PI control, beta = 0.04) or ``"standard"`` (I control).
      safety: the step-size safety factor (0.9).
      max_steps: bound on the attempted steps. If the end is not reached within it the result is
        NaN (check ``return_nfe`` / raise ``max_steps``).
      differentiable: run a bounded ``lax.scan`` instead of the ``while_loop`` so that reverse-mode
        ``jax.grad`` works (the scan always runs ``max_steps`` iterations: set it tight).
      return_nfe: if True, return ``(x, nfe)`` with ``nfe`` the number of model calls (an int32
        array); if False (the default, the registry's uniform contract), return ``x`` only.

    Returns:
      ``x`` at the grid's last point, or ``(x, nfe)`` with ``return_nfe=True``.
    """
    validate("pf_ode_adaptive", x, grid, key, stochastic=False)
    if controller not in _CONTROLLERS:
        raise ValueError(f"pf_ode_adaptive: controller must be one of {', '.join(_CONTROLLERS)}, got {controller!r}")
    concrete = all(isinstance(v, (int, float)) for v in (rtol, atol))  # (they may be traced, too)
    if concrete and not (rtol > 0 and atol > 0):
        raise ValueError(f"pf_ode_adaptive: rtol and atol must be > 0, got rtol={rtol}, atol={atol}")
    beta = _CONTROLLERS[controller]
    expo = 0.2 - 0.75 * beta
    fac_min, fac_max = 0.2, 10.0
    dtype, process = x.dtype, grid.process
    c, a, e = DOPRI5["c"], DOPRI5["a"], DOPRI5["e"]

    def velocity(x, t):
        x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
        alpha, sigma = process.alpha(t), process.sigma(t)
        da, ds = process.derivatives(t)
        return da * x0 + ds * (x - alpha * x0) / sigma

    def rms(v):
        return jnp.sqrt(jnp.mean(v * v))

    ends_clean = grid.sigma[-1] == 0
    t0 = grid.t[0].astype(jnp.float32)
    t1 = jnp.where(ends_clean, grid.t[-2], grid.t[-1]).astype(jnp.float32)  # (t[-2] = t[0] for 2 points)
    direction = jnp.where(t1 < t0, -1.0, 1.0)
    span = jnp.abs(t1 - t0)

    x = x.astype(jnp.float32)
    k1 = velocity(x, t0)

    # Starting step size (Hairer I, Sec. II.4): h0 = 0.01 |x| / |f|, one trial Euler step, then
    # h1 from the second-derivative estimate; h = min(100 h0, h1). One model call.
    scale = atol + rtol * jnp.abs(x)
    d0, d1 = rms(x / scale), rms(k1 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6 * jnp.maximum(span, 1.0), 0.01 * d0 / d1)
    h0 = jnp.minimum(h0, span)
    k_trial = velocity(x + direction * h0 * k1, t0 + direction * h0)
    d2 = rms((k_trial - k1) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(dmax, 1e-15)) ** 0.2)
    h_init = jax.lax.stop_gradient(jnp.minimum(jnp.minimum(100.0 * h0, h1), span))

    # state: t, x, k1 (FSAL), |h|, err_prev, rejected-last, nfe, attempted steps
    State = tuple

    def body(state: State) -> State:
        t, x, k1, h, err_prev, rejected, nfe, n = state
        last = h >= jnp.abs(t1 - t)
        h = jnp.minimum(h, jnp.abs(t1 - t))
        hs = direction * h
        ks = [k1]
        for i in range(1, 7):
            xi = x + hs * sum(aij * kj for aij, kj in zip(a[i], ks) if aij != 0.0)
            ks.append(velocity(xi, t + c[i] * hs))
        x_new = xi  # stage 7 is evaluated at the 5th-order solution (FSAL)
        err = hs * sum(ei * ki for ei, ki in zip(e, ks) if ei != 0.0)
        sc = atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x_new))
        err_norm = jax.lax.stop_gradient(jnp.maximum(rms(err / sc), 1e-10))
        accept = err_norm <= 1.0
        fac = safety * err_norm ** (-expo) * err_prev**beta
        fac = jnp.clip(fac, fac_min, fac_max)
        fac_rej = jnp.clip(safety * err_norm ** (-expo), fac_min, 1.0)
        h_next = jnp.where(accept, h * jnp.where(rejected, jnp.minimum(fac, 1.0), fac), h * fac_rej)
        t_new = jnp.where(accept, jnp.where(last, t1, t + hs), t)
        return (
            t_new,
            jnp.where(accept, x_new, x),
            jnp.where(accept, ks[6], k1),
            jax.lax.stop_gradient(h_next),
            jnp.where(accept, jnp.maximum(err_norm, 1e-4), err_prev),
            ~accept,
            nfe + 6,
            n + 1,
        )

    def running(state: State):
        t, *_, n = state
        return (jnp.abs(t1 - t) > 0) & (n < max_steps)

    init = (t0, x, k1, h_init, jnp.asarray(1e-4, jnp.float32), jnp.asarray(False),
            jnp.asarray(2, jnp.int32), jnp.asarray(0, jnp.int32))
    if differentiable:
        def scan_body(state, _):
            return jax.lax.cond(running(state), body, lambda s: s, state), None

        final, _ = jax.lax.scan(scan_body, init, None, length=int(max_steps))
    else:
        final = jax.lax.while_loop(running, body, init)
    t_end, x_end, *_, nfe, _ = final
    x_end = jnp.where(jnp.abs(t1 - t_end) > 0, jnp.nan, x_end)  # max_steps ran out

    def to_clean(v):
        return denoise(v.astype(dtype), t1).astype(jnp.float32)

    x_end = jax.lax.cond(ends_clean, to_clean, lambda v: v, x_end)
    nfe = nfe + ends_clean.astype(jnp.int32)
    x_end = x_end.astype(dtype)
    return (x_end, nfe) if return_nfe else x_end


pf_ode_adaptive.order = 5
pf_ode_adaptive.stochastic = False
