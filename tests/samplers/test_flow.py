"""flow_euler / flow_heun: the velocity-form Euler and Heun of diffusers' FlowMatch schedulers.

Checks: on rectified flow they equal the existing ``euler`` (DDIM form) and ``heun`` (time frame)
to 1e-6; the step is x + (t' - t) v written out by hand; their convergence order (1 and 2) on
Gaussian data against the exact PF-ODE solution, x(t) = x(t0) sqrt(alpha^2 c^2 + sigma^2)(t) /
sqrt(...)(t0) for x0 ~ N(0, c^2); registry, bfloat16, vmap and grad through the loop.
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
RF = P.RectifiedFlow()
NAMES = ["flow_euler", "flow_heun"]
ORDER = {"flow_euler": 1, "flow_heun": 2}


def nonlinear_denoiser(w):
    def denoise(x, t):
        return jnp.tanh(w * x / (1.0 + t)) * (1.0 + 0.1 * jnp.cos(x))

    return denoise


@functools.lru_cache(maxsize=None)
def compiled(name, model="gauss"):
    """jitted f(x, grid, p): sampler ``name`` with the Gaussian denoiser of std p or the nonlinear
    one of weight p (cached: tests with the same shapes share compiles)."""

    def f(x, grid, p):
        den = gaussian_denoiser(grid.process, p) if model == "gauss" else nonlinear_denoiser(p)
        return samplers.get(name)(den, x, grid)

    return jax.jit(f)


X = jnp.asarray([[1.0, -0.5, 2.0, 0.3], [0.2, 1.1, -1.4, 0.7]])
GRIDS = {  # both 11 points: one compile per sampler
    "clean_end": S.make_grid(RF, 10),  # t = 1 (alpha = 0) ... 0.1, then the clean point
    "last": S.grid_from_times(RF, np.linspace(1.0, 0.02, 11), final="last"),
}


def test_registry():
    for name in NAMES:
        fn = samplers.get(name)
        assert fn is getattr(samplers, name) and name in samplers.available()
        assert fn.order == ORDER[name] and fn.stochastic is False


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_equal_to_euler_and_heun_on_rectified_flow(grid_name):
    """Rectified flow: flow_euler is euler and flow_heun is heun (to float32 rounding), from t = 1
    (alpha = 0) to either end."""
    grid = GRIDS[grid_name]
    assert float(grid.alpha[0]) == 0.0
    for flow, ref in (("flow_euler", "euler"), ("flow_heun", "heun")):
        a = compiled(flow, "nl")(X, grid, 1.3)
        b = compiled(ref, "nl")(X, grid, 1.3)
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6, err_msg=f"{flow} vs {ref}")


def test_velocity_step_by_hand():
    """One step of each, written as diffusers' FlowMatch schedulers do: v = eps_hat - x0_hat,
    x' = x + (t' - t) v; Heun averages v at both ends."""
    den = nonlinear_denoiser(0.8)
    t0, t1 = 0.7, 0.4
    grid = S.grid_from_times(RF, [t0, t1], final="last")

    def v(x, t):
        x0 = den(x, t)
        return (x - (1 - t) * x0) / t - x0

    euler = X + (t1 - t0) * v(X, t0)
    heun = X + (t1 - t0) * 0.5 * (v(X, t0) + v(euler, t1))
    np.testing.assert_allclose(np.asarray(samplers.flow_euler(den, X, grid)), np.asarray(euler), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(samplers.flow_heun(den, X, grid)), np.asarray(heun), rtol=1e-6, atol=1e-6)
    # ... and the step into sigma = 0 lands on x0_hat (Euler: x - t v = x0_hat)
    g0 = S.grid_from_times(RF, [t0])
    np.testing.assert_allclose(np.asarray(samplers.flow_heun(den, X, g0)), np.asarray(den(X, t0)), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Convergence order on Gaussian data (as tests/samplers/test_samplers.py does for the others).
# ------------------------------------------------------------------------------------------

STEPS = [16, 32, 64, 128]
CONVERGENCE = {
    "rectified_flow": lambda n: S.grid_from_times(RF, np.linspace(1.0, 0.02, n + 1), final="last"),
}


def _pad(grid, num_steps):
    """Repeat the last point (zero-length steps are no-ops) so all step counts share one compile."""
    k = num_steps + 1 - grid.t.shape[0]
    rep = lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], k)])  # noqa: E731
    return S.Grid(t=rep(grid.t), alpha=rep(grid.alpha), sigma=rep(grid.sigma), process=grid.process)


def _ode_scale(grid, c=C):
    a0, s0, a1, s1 = (float(v) for v in (grid.alpha[0], grid.sigma[0], grid.alpha[-1], grid.sigma[-1]))
    return np.sqrt(a1**2 * c**2 + s1**2) / np.sqrt(a0**2 * c**2 + s0**2)


@pytest.mark.parametrize("case,name", [(c, n) for c in CONVERGENCE for n in NAMES])
def test_pf_ode_convergence_order(case, name):
    """Error vs the exact PF-ODE solution; the log-log slope is the declared order (1, 2)."""
    f = compiled(name)
    errs = []
    for n in STEPS:
        grid = CONVERGENCE[case](n)
        x = X[:1] * jnp.sqrt(grid.alpha[0] ** 2 * C**2 + grid.sigma[0] ** 2)
        exact = np.asarray(x, np.float64) * _ode_scale(grid)
        out = np.asarray(f(x, _pad(grid, STEPS[-1]), C), np.float64)
        errs.append(np.max(np.abs(out - exact)) / np.max(np.abs(exact)))
    errs = np.asarray(errs)
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert abs(slope - ORDER[name]) < 0.3, (errs, slope)
    assert errs[-1] < (3e-2 if ORDER[name] == 1 else 2e-3), errs


# ------------------------------------------------------------------------------------------
# dtype and transformations.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_vmap_and_grad(name):
    grid = GRIDS["clean_end"]
    f = compiled(name)
    out = f(X, grid, C)
    outb = f(X.astype(jnp.bfloat16), grid, C)
    assert outb.dtype == jnp.bfloat16 and outb.shape == X.shape
    assert float(jnp.max(jnp.abs(outb.astype(jnp.float32) - out))) < 5e-2 * float(jnp.max(jnp.abs(out)))
    xs = jnp.stack([X, -2.0 * X])
    vm = jax.vmap(lambda x: f(x, grid, C))(xs)
    np.testing.assert_allclose(np.asarray(vm[1]), np.asarray(f(xs[1], grid, C)), rtol=1e-5, atol=1e-6)
    # Gaussian data: the sampler is linear in x, out = m x, so d sum(out) / dx = m = out / x.
    gx = jax.grad(lambda x: jnp.sum(f(x, grid, C)))(X)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(out / X), rtol=1e-4)
    # ... and the gradient in the data std matches central differences
    gc = jax.grad(lambda c: jnp.sum(f(X, grid, c) ** 2))(C)
    h = 1e-3
    fd = (jnp.sum(f(X, grid, C + h) ** 2) - jnp.sum(f(X, grid, C - h) ** 2)) / (2 * h)
    np.testing.assert_allclose(float(gc), float(fd), rtol=1e-2)
