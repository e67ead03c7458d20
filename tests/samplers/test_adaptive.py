"""pf_ode_adaptive: Dormand-Prince 5(4) on the probability-flow ODE, checked on Gaussian data.

For x0 ~ N(0, c^2) the PF-ODE dx/dt = [alpha' k + sigma' (1 - alpha k) / sigma] x, with
k = alpha c^2 / (alpha^2 c^2 + sigma^2), has the exact solution
x(t) = x(t0) sqrt(alpha^2 c^2 + sigma^2)(t) / sqrt(...)(t0). Independent reference: scipy's
``solve_ivp(method="RK45")`` in float64 on the same ODE -- the same Dormand-Prince pair with the same
starting-step rule and the same standard controller, so with ``controller="standard"`` both take
(nearly) the same steps and reach the same error. Then: the error falls with the tolerance and
stays within a small multiple of it, a tighter rtol costs more model calls, the clean end point,
alpha = 0 starts, running out of max_steps, and jit / vmap / jvp / grad / bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from tests.samplers.gaussian import gaussian_denoiser

C = 0.5
VPL, EDM, RF = P.VPLinear(), P.EDM(), P.RectifiedFlow()
X = jnp.asarray([[1.0, -0.5, 2.0, 0.3]])
# 3-point grids: only the end points matter (the middle one is ignored), one compile per process.
GRIDS = {
    "vp_linear": S.grid_from_times(VPL, [1.0, 0.5, 1e-3], final="last"),
    "edm": S.grid_from_times(EDM, [80.0, 1.0, 0.002], final="last"),
}


@functools.lru_cache(maxsize=None)
def compiled(controller, **kw):
    """jitted f(x, grid, rtol, atol) -> (x, nfe); the tolerances are traced (one compile for all)."""

    def run(x, grid, rtol, atol):
        return samplers.pf_ode_adaptive(gaussian_denoiser(grid.process), x, grid, rtol=rtol, atol=atol,
                                        controller=controller, return_nfe=True, **kw)

    return jax.jit(run)


def _marginal_std(proc, t, c=C):
    return float(np.sqrt(float(proc.alpha(t)) ** 2 * c**2 + float(proc.sigma(t)) ** 2))


def _start(grid):
    return X * _marginal_std(grid.process, grid.t[0])


def _exact(grid, t_end):
    return np.asarray(_start(grid), np.float64) * _marginal_std(grid.process, t_end) / _marginal_std(grid.process,
                                                                                                   grid.t[0])


def _rel(out, ref):
    return float(np.max(np.abs(np.asarray(out, np.float64) - ref)) / np.max(np.abs(ref)))


def _scipy_rk45(grid, rtol, atol):
    integrate = pytest.importorskip("scipy.integrate")
    proc = grid.process
    t0, t1 = float(grid.t[0]), float(grid.t[-1])

    def rhs(t, y):  # float64 coefficients: closed forms for VP linear and EDM
        if proc is EDM:
            a, s, da, ds = 1.0, t, 0.0, 1.0
        else:
            b = VPL.beta_max - VPL.beta_min
            la = -0.25 * t**2 * b - 0.5 * t * VPL.beta_min
            a = np.exp(la)
            s = np.sqrt(-np.expm1(2 * la))
            da = a * (-0.5 * t * b - 0.5 * VPL.beta_min)
            ds = -a * da / s
        k = a * C**2 / (a**2 * C**2 + s**2)
        return (da * k + ds * (1 - a * k) / s) * y

    sol = integrate.solve_ivp(rhs, (t0, t1), np.asarray(_start(grid), np.float64)[0], method="RK45",
                              rtol=rtol, atol=atol)
    assert sol.success
    return sol.y[:, -1], sol.nfev


@pytest.mark.parametrize("case", list(GRIDS))
def test_standard_controller_matches_scipy_rk45(case):
    """Same pair, same starting step, same I-controller as scipy's RK45: the number of model calls
    agrees with scipy's float64 run, and at rtol = 1e-3 (where the truncation error dominates) so
    does the error against the exact solution. At rtol = 1e-4 the float32 state and eps_hat =
    (x - alpha x0_hat) / sigma (cancellation near sigma_min) add error of that order. Both runs stay
    within 20 rtol (a global error; rtol bounds the local one)."""
    grid = GRIDS[case]
    f = compiled("standard")
    exact = _exact(grid, grid.t[-1])
    for rtol in (1e-3, 1e-4):
        atol = 1e-2 * rtol
        out, nfe = f(_start(grid), grid, rtol, atol)
        ref, nfev = _scipy_rk45(grid, rtol, atol)
        err, err_ref = _rel(out, exact), _rel(ref, exact)
        assert abs(int(nfe) - nfev) <= 0.1 * nfev, (case, rtol, int(nfe), nfev)
        if rtol == 1e-3:
            assert err_ref / 1.2 <= err <= 1.2 * err_ref, (case, rtol, err, err_ref)
        assert err < 20 * rtol and err_ref < 20 * rtol, (case, rtol, err, err_ref)  # global vs local error


def test_error_vs_tolerance_and_cost():
    """PI control (EDM, sigma 80 -> 0.002): the error against the exact solution is within 10 rtol,
    falls with the tolerance, and tighter tolerances cost more model calls."""
    grid = GRIDS["edm"]
    f = compiled("pi")
    exact = _exact(grid, grid.t[-1])
    errs, nfes = [], []
    for rtol in (1e-3, 1e-4, 1e-5):
        out, nfe = f(_start(grid), grid, rtol, 1e-2 * rtol)
        errs.append(_rel(out, exact))
        nfes.append(int(nfe))
        assert errs[-1] < 10 * rtol, (rtol, errs)
    assert nfes[0] < nfes[1] < nfes[2], nfes
    assert errs[2] < errs[0] / 30, errs
    # the standard controller meets the same bound
    out, _ = compiled("standard")(_start(grid), grid, 1e-4, 1e-6)
    assert _rel(out, exact) < 10 * 1e-4


def test_clean_end_point_and_alpha_zero_start():
    """A grid ending at sigma = 0: integrate to the point before it, then x0_hat (one more call).
    A flow grid from t = 1 (alpha = 0) to t = 1e-3 and the clean point: x(0) = c x(1) exactly (up
    to the posterior spread at t = 1e-3, 4e-6 relative)."""
    f = compiled("pi")
    g = S.grid_from_times(EDM, [80.0, 0.002])  # appends the clean point: 3 points, as GRIDS
    out, nfe = f(_start(g), g, 1e-5, 1e-7)
    at_min, nfe_min = f(_start(g), GRIDS["edm"], 1e-5, 1e-7)
    np.testing.assert_allclose(np.asarray(out), np.asarray(gaussian_denoiser(EDM)(at_min, 0.002)), rtol=1e-6)
    assert int(nfe) == int(nfe_min) + 1
    gf = S.grid_from_times(RF, [1.0, 1e-3])
    assert float(gf.alpha[0]) == 0.0 and float(gf.sigma[-1]) == 0.0
    out, nfe = f(_start(gf), gf, 1e-5, 1e-7)
    assert _rel(out, np.asarray(_start(gf), np.float64) * C) < 1e-4, np.asarray(out)


def test_validation_and_max_steps():
    den = gaussian_denoiser(EDM)
    grid = GRIDS["edm"]
    with pytest.raises(ValueError, match="controller must be one of pi, standard"):
        samplers.pf_ode_adaptive(den, X, grid, controller="pid")
    with pytest.raises(ValueError, match="rtol and atol must be > 0"):
        samplers.pf_ode_adaptive(den, X, grid, rtol=0.0)
    fn = samplers.get("pf_ode_adaptive")
    assert fn is samplers.pf_ode_adaptive and fn.order == 5 and fn.stochastic is False
    out, nfe = samplers.pf_ode_adaptive(den, X, grid, max_steps=3, return_nfe=True)
    assert bool(jnp.all(jnp.isnan(out))) and int(nfe) == 2 + 3 * 6  # ran out: NaN, not a wrong number


def test_transforms_and_dtype():
    """vmap (one step size per lane), forward-mode jvp through the while loop, reverse-mode grad with
    differentiable=True (a bounded scan: the same result), bfloat16 state. On Gaussian data the
    solution is linear in x on a fixed mesh, so d out / dx = out / x."""
    grid = GRIDS["edm"]
    den = gaussian_denoiser(EDM)
    x = _start(grid)
    run = jax.jit(lambda v: samplers.pf_ode_adaptive(den, v, grid, rtol=1e-4, atol=1e-6))
    out = run(x)
    assert out.shape == x.shape and out.dtype == jnp.float32
    xs = jnp.stack([x, 3.0 * x])
    vm = jax.jit(jax.vmap(run))(xs)
    # each lane its own mesh (atol makes lane 1's differ from lane 0's); both within tolerance
    for i in range(2):
        assert _rel(vm[i], np.asarray(xs[i], np.float64) * _marginal_std(EDM, 0.002) / _marginal_std(EDM, 80.0)) < 1e-3
        assert _rel(vm[i], np.asarray(run(xs[i]), np.float64)) < 1e-3
    _, tangent = jax.jvp(run, (x,), (jnp.ones_like(x),))
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(out / x), rtol=1e-4)
    diff = jax.jit(lambda v: samplers.pf_ode_adaptive(den, v, grid, rtol=1e-4, atol=1e-6, differentiable=True,
                                                      max_steps=40))
    np.testing.assert_allclose(np.asarray(diff(x)), np.asarray(out), rtol=1e-6)
    gx = jax.jit(jax.grad(lambda v: jnp.sum(diff(v))))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(out / x), rtol=1e-4)
    outb = run(x.astype(jnp.bfloat16))
    assert outb.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(outb.astype(jnp.float32) - out))) < 2e-2 * float(jnp.max(jnp.abs(out)))
