"""The k-diffusion family of samplers: ancestral, DPM-Solver-2, DPM-Solver++ SDE / 2M SDE / 3M (SDE),
LMS and iPNDM.

Checks: registry attributes and validation; shape, dtype, jit == eager and per-key reproducibility;
identities with each other and with euler / dpmpp_2m / ddpm; the (alpha, sigma) bookkeeping
(the same run on a discrete VP chain and on EDM, related by x_VP = alpha x_VE); finiteness from
alpha = 0; convergence order on Gaussian data against the exact PF-ODE solution; and the marginal
variance of the stochastic samplers on Gaussian data.

Gaussian data x0 ~ N(0, c^2): the exact denoiser is x0_hat = alpha c^2 / (alpha^2 c^2 + sigma^2) x and
in the VE frame the PF-ODE solution is x~(s) = x~(s0) sqrt(c^2 + s^2) / sqrt(c^2 + s0^2).

Compile time dominates on CPU, so: keys are ``jax.random.key(i, impl="rbg")`` (the samplers only
split and draw from them; rbg compiles several times faster than threefry), the jitted runners are
cached and, for small arrays, compiled with XLA's cheap CPU settings (``FAST``: about half the
compile time, same numerics to float32 rounding), and tests share compiles where process, grid
length and shape agree.
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
EDM = P.EDM()
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
ORDER = {
    "euler_ancestral": 1, "dpm2": 2, "dpm2_ancestral": 2, "dpmpp_2s_ancestral": 2, "dpmpp_sde": 2,
    "dpmpp_2m_sde": 2, "dpmpp_3m_sde": 2, "dpmpp_3m": 2, "lms": 4, "ipndm": 2, "ipndm_v": 2,
}
NAMES = list(ORDER)
STOCHASTIC = ["euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"]


def rbg(i):
    return jax.random.key(i, impl="rbg")


def denoiser(proc, c=C, w=0.0):
    """The exact Gaussian denoiser plus w times a smooth nonlinearity, both functions of the VE-frame
    state and noise level (x~ = x / alpha, s = sigma / alpha):
    x0_hat = x~ c^2 / (c^2 + s^2) + w tanh(x~ / (1 + s)) / (1 + s),
    written so that it is finite at alpha = 0."""

    def denoise(x, t):
        a, s = proc.alpha(t), proc.sigma(t)
        return (a * c**2 / (a**2 * c**2 + s**2)) * x + w * (a / (a + s)) * jnp.tanh(x / (a + s))

    return denoise


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def ode_scale(grid, c=C):
    a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    a1, s1 = float(grid.alpha[-1]), float(grid.sigma[-1])
    return np.sqrt(a1**2 * c**2 + s1**2) / np.sqrt(a0**2 * c**2 + s0**2)


def eager(name, den, x, grid, key=None, **kw):
    with jax.disable_jit():
        return samplers.get(name)(den, x, grid, key=key, **kw)


@functools.lru_cache(maxsize=None)
def _compiled(name, kw, fast):
    stochastic = name in STOCHASTIC

    def f(x, grid, key, c, w, eta, s_noise):
        # traced eta / s_noise: eta = 0 runs the ODE sampler in the same compiled program
        extra = {"eta": eta, "s_noise": s_noise} if stochastic else {}
        return samplers.get(name)(denoiser(grid.process, c, w), x, grid, key=key, **extra, **dict(kw))

    return jax.jit(f, compiler_options=FAST if fast else None)


def compiled(name, fast=True, **kw):
    """``f(x, grid, key, c=C, w=0, eta=1, s_noise=1)``, jitted and cached: calls sharing a process,
    grid length and shape share the compile. ``fast``: XLA's cheap CPU settings, for small arrays
    only (unoptimised code is slow on large ones)."""
    g = _compiled(name, tuple(sorted(kw.items())), fast)
    return lambda x, grid, key, c=C, w=0.0, eta=1.0, s_noise=1.0: g(x, grid, key, c, w, eta, s_noise)


# ------------------------------------------------------------------------------------------
# Registry and validation.
# ------------------------------------------------------------------------------------------


def test_registry_and_attributes():
    for name in NAMES:
        fn = samplers.get(name)
        assert name in samplers.available() and fn is getattr(samplers, name)
        assert fn.order == ORDER[name], name
        assert fn.stochastic == (name in STOCHASTIC), name


def test_validation():
    """Eager argument checks (run at trace time: ``jax.eval_shape`` traces without compiling)."""
    den = gaussian_denoiser(EDM)
    grid = S.make_grid(EDM, 3)
    x = jnp.ones((2, 3))

    def call(name, *args, **kw):
        return jax.eval_shape(lambda: samplers.get(name)(den, *args, **kw))

    for name in STOCHASTIC:
        for kw in ({}, {"eta": 0.5}, {"eta": 1.0, "s_noise": 0.5}):
            with pytest.raises(ValueError, match="stochastic: pass key"):
                call(name, x, grid, **kw)
        assert call(name, x, grid, eta=0.0).shape == x.shape  # deterministic: no key needed
        assert call(name, x, grid, s_noise=0.0).shape == x.shape
    for name in NAMES:
        with pytest.raises(TypeError, match="Grid"):
            call(name, x, {"t": grid.t}, key=rbg(0))
        with pytest.raises(TypeError, match="floating"):
            call(name, jnp.ones((2, 3), jnp.int32), grid, key=rbg(0))
    with pytest.raises(ValueError, match="solver_type"):
        call("dpmpp_2m_sde", x, grid, key=rbg(0), solver_type="euler")
    with pytest.raises(ValueError, match="order"):
        call("lms", x, grid, order=0)
    for name in ("ipndm", "ipndm_v"):
        with pytest.raises(ValueError, match="max_order"):
            call(name, x, grid, max_order=5)


# ------------------------------------------------------------------------------------------
# One compile per sampler: bookkeeping, jit vs eager, keys, dtype, and starting at alpha = 0.
# ------------------------------------------------------------------------------------------

ZSNR = P.discrete_vp(rescale_betas_zero_snr=True)
SIG8 = S.karras_sigmas(8, 0.03, 80.0)
KARRAS_ZSNR = S.grid_from_sigmas(ZSNR, SIG8)  # 9 points, alpha > 0
TRAILING_ZSNR = S.make_grid(ZSNR, 8, "trailing")  # 9 points, alpha = 0 at the start
X_VE = 80.0 * jax.random.normal(jax.random.key(6), (2, 2, 4))


@pytest.mark.parametrize("name", NAMES)
def test_sampler_on_discrete_vp(name):
    """(1) The alpha / sigma bookkeeping, and jit against eager: on a discrete VP chain at the same
    sigma / alpha values as an EDM grid, with a denoiser defined in the VE frame, the jitted run
    equals the eager EDM run mapped by x_VP = alpha x_VE (the injected noise too: same keys).
    (2) Shape, dtype and keys. (3) From alpha = 0 (zero terminal SNR, "trailing"): finite, and with
    eta = 0 near the exact PF-ODE end point."""
    f = compiled(name)
    k1, k2 = rbg(1), rbg(2)
    x_vp = KARRAS_ZSNR.alpha[0] * X_VE
    out = f(x_vp, KARRAS_ZSNR, k1, w=0.3)
    assert out.shape == X_VE.shape and out.dtype == X_VE.dtype
    assert float(KARRAS_ZSNR.alpha[-1]) == 1.0  # the last point is clean: x_VP = x_VE there
    ref = eager(name, denoiser(EDM, C, 0.3), X_VE, S.grid_from_sigmas(EDM, SIG8), k1,
                **({"eta": 1.0} if name in STOCHASTIC else {}))
    assert rel(out, ref) < 1e-4, rel(out, ref)

    np.testing.assert_array_equal(np.asarray(f(x_vp, KARRAS_ZSNR, k1, w=0.3)), np.asarray(out))
    other = f(x_vp, KARRAS_ZSNR, k2, w=0.3)
    if name in STOCHASTIC:
        assert rel(other, out) > 1e-3
        np.testing.assert_allclose(np.asarray(f(x_vp, KARRAS_ZSNR, k2, w=0.3, eta=0.0)),
                                   np.asarray(f(x_vp, KARRAS_ZSNR, k1, w=0.3, eta=0.0)), rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(other), np.asarray(out))
    assert rel(f(x_vp, KARRAS_ZSNR, k1), out) > 1e-3  # the nonlinearity matters

    grid = TRAILING_ZSNR
    assert float(grid.alpha[0]) == 0.0
    x = X_VE / 80.0 * grid.sigma[0]
    ode = f(x, grid, k1, eta=0.0)
    assert bool(jnp.all(jnp.isfinite(ode)))
    # a sanity bound: 8 steps with diffusers' trailing spacing end with a first-order jump from
    # sigma / alpha = 0.43 to 0, and even heun / dpmpp_2m are 0.19 / 0.27 off here
    assert rel(ode, np.asarray(x) * ode_scale(grid)) < 0.35, rel(ode, np.asarray(x) * ode_scale(grid))
    if name in STOCHASTIC:
        assert bool(jnp.all(jnp.isfinite(f(x, grid, k1, w=0.3))))


@pytest.mark.parametrize("name", ["dpm2", "dpmpp_2s_ancestral"])
def test_rectified_flow_from_alpha_zero(name):
    """The midpoint samplers on a flow from t = 1 (alpha = 0): midpoints map back to time through
    RectifiedFlow.t_from_sigma_ratio."""
    grid = S.make_grid(P.RectifiedFlow(), 8)
    assert float(grid.alpha[0]) == 0.0
    x = X_VE / 80.0 * grid.sigma[0]
    out = compiled(name)(x, grid, rbg(1), eta=0.0)
    assert rel(out, np.asarray(x) * ode_scale(grid)) < 0.15


def test_bfloat16_state():
    """A bfloat16 state stays bfloat16 (the update runs in float32) and tracks the float32 run."""
    x = KARRAS_ZSNR.alpha[0] * X_VE
    f = compiled("dpmpp_3m_sde")
    out = f(x.astype(jnp.bfloat16), KARRAS_ZSNR, rbg(1), w=0.3)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    assert rel(out.astype(jnp.float32), f(x, KARRAS_ZSNR, rbg(1), w=0.3)) < 5e-2


# ------------------------------------------------------------------------------------------
# Identities.
# ------------------------------------------------------------------------------------------


def test_identities():
    """eta = 0 turns each SDE / ancestral sampler into its ODE counterpart; LMS of order 1 is Euler;
    iPNDM_v with two points is variable-step AB2 = LMS(2) (on a grid ending at sigma > 0: iPNDM's
    step into 0 returns x0_hat); Euler-ancestral with eta = 1 is DDPM's posterior step (Ho et al.
    2020) written in the VE frame -- same key, same noise. (Same compiles as the test above.)"""
    grid, key = KARRAS_ZSNR, rbg(3)
    x = KARRAS_ZSNR.alpha[0] * X_VE

    def run(name, **kw):
        eta = kw.pop("eta", 1.0)
        return compiled(name, **kw)(x, grid, key, w=0.3, eta=eta)

    pairs = [
        (run("euler_ancestral", eta=0.0), run("euler")),
        (run("dpm2_ancestral", eta=0.0), run("dpm2")),
        (run("dpmpp_2m_sde", eta=0.0), run("dpmpp_2m")),
        (run("dpmpp_3m_sde", eta=0.0), run("dpmpp_3m")),
        (run("dpmpp_sde", eta=0.0), run("dpmpp_2s_ancestral", eta=0.0)),
        (run("lms", order=1), run("euler")),
        (run("euler_ancestral"), run("ddpm")),
    ]
    for i, (a, b) in enumerate(pairs):
        assert rel(a, b) < 2e-5, (i, rel(a, b))
    assert rel(run("lms"), run("euler")) > 1e-2  # ... and the higher orders are not Euler
    last = S.grid_from_sigmas(ZSNR, SIG8, final="last")
    a = compiled("ipndm_v", max_order=2)(x, last, key, w=0.3)
    assert rel(a, compiled("lms", order=2)(x, last, key, w=0.3)) < 2e-5


# ------------------------------------------------------------------------------------------
# Convergence order on Gaussian data.
# ------------------------------------------------------------------------------------------

# (name, static options, declared order, step counts in the asymptotic range); the SDE samplers run
# with eta = 0.
CONVERGENCE = [
    ("dpm2", {}, 2, (20, 80)),
    ("dpmpp_2s_ancestral", {}, 2, (20, 80)),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 2, (20, 80)),
    ("ipndm", {}, 2, (20, 80)),
    ("lms", {}, 4, (40, 160)),
    ("dpmpp_3m", {}, 2, (80, 320)),
]
X14 = jnp.asarray([[1.0, -0.5, 2.0, 0.3]])


def _karras_errors(name, kw, steps):
    f = compiled(name, **kw)
    errs = []
    for n in steps:
        grid = S.grid_from_sigmas(EDM, S.karras_sigmas(n + 1, 0.002, 80.0), final="last")
        x = X14 * grid.sigma[0]
        errs.append(rel(f(x, grid, rbg(0), eta=0.0), np.asarray(x, np.float64) * ode_scale(grid)))
    return np.asarray(errs)


@pytest.mark.parametrize("name,kw,order,steps", CONVERGENCE, ids=[c[0] for c in CONVERGENCE])
def test_pf_ode_convergence_order(name, kw, order, steps):
    """Error at sigma_min against the exact PF-ODE solution on Karras grids (EDM, rho = 7) ending
    at sigma_min (no final jump to 0, which is exact here); the log-log slope is the global order.

    dpmpp_3m is k-diffusion's / diffusers' DPM-Solver++(3M) update, which integrates only half of a
    second-derivative term (:func:`test_dpmpp_3m_second_difference`), so it converges at second
    order -- a float64 run of k-diffusion's own ``sample_dpmpp_3m_sde(eta=0)`` gives the same
    errors. iPNDM's fixed Adams-Bashforth weights on an uneven grid are second order; LMS with
    Lagrange weights is 4th order (its slope is still rising to 4 at these N).
    """
    assert samplers.get(name).order == order
    errs = _karras_errors(name, kw, steps)
    slope = np.log(errs[0] / errs[1]) / np.log(steps[1] / steps[0])
    assert abs(slope - order) < 0.4, (errs, slope)
    assert errs[-1] < 5e-3, errs


def test_ipndm_v_converges():
    """iPNDM_v (zju-pi's weights): its 4th-order weights sum to 1 only up to O(step-ratio change^2),
    so on Karras grids the error stalls around N = 40-80 before decaying at ~2nd order; with
    max_order = 3 it is third order. (Checked against a float64 transcription in test_vs_kdiffusion.)"""
    errs = _karras_errors("ipndm_v", {}, (80, 320))
    errs3 = _karras_errors("ipndm_v", {"max_order": 3}, (80, 320))
    assert errs[0] < 1e-3 and errs[1] < errs[0] / 3, errs
    assert errs3[1] < errs3[0] / 20 and errs3[1] < 1e-5, errs3  # ~3rd order from 80 to 320


def test_dpmpp_3m_second_difference():
    """Why dpmpp_3m is second order: with an x-independent x0_hat = m(lambda) on EDM (x~ = x), the
    exact step is x(lam + h) = e^{-h} x(lam) + int_0^h e^{-(h - u)} m(lam + u) du. The third-order
    update of k-diffusion / diffusers (D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 m'' / 2, weighted by
    -phi_3) integrates linear m exactly but only half the m'' term: for m = lambda^2 it is short by
    I / 2, I = h^2 - 2h + 2 - 2 e^{-h}."""
    h = 0.5
    sig = np.exp(-h * np.arange(4.0))  # lambda = -log s = 0, h, 2h, 3h
    three = S.grid_from_sigmas(EDM, sig, final="last")
    two = S.grid_from_sigmas(EDM, sig[:3], final="last")
    u = np.linspace(0.0, h, 200001)

    def integral(f):  # trapezoid rule in float64 (error ~1e-12 here)
        y = f(u)
        return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(u)))

    for coeffs in ((0.3, 0.7, 0.0), (0.0, 0.0, 1.0)):
        a, b, q = coeffs
        m = lambda lam: a + b * lam + q * lam**2  # noqa: E731
        den = lambda x, t: jnp.full_like(x, m(-jnp.log(t)))  # noqa: E731
        x2 = float(eager("dpmpp_3m", den, jnp.zeros((1,)), two)[0])  # steps 1 and 2 (orders 1, 2)
        x3 = float(eager("dpmpp_3m", den, jnp.zeros((1,)), three)[0])  # ... then the third-order step
        inc = x3 - np.exp(-h) * x2
        exact = integral(lambda v: np.exp(-(h - v)) * m(2 * h + v))
        if q == 0:
            assert abs(inc - exact) < 2e-6, (inc, exact)
        else:
            short = (h**2 - 2 * h + 2 - 2 * np.exp(-h)) / 2
            assert abs(inc - exact) > 1e-2
            assert abs(inc - (exact - short)) < 2e-6, (inc, exact, short)


# ------------------------------------------------------------------------------------------
# Marginal variance of the stochastic samplers on Gaussian data.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_marginal_variance(name):
    """From the exact marginal at sigma_max, 300 steps of each sampler (eta = 1) end with variance
    c^2 (Monte Carlo and discretisation tolerance); without the injected noise (s_noise = 0) the
    chain collapses, so the test sees the noise."""
    grid = S.grid_from_sigmas(EDM, S.karras_sigmas(300, 0.002, 80.0))
    n = 1 << 14
    x = jnp.sqrt(grid.sigma[0] ** 2 + C**2) * jax.random.normal(jax.random.key(9), (n,))
    f = compiled(name, fast=False)
    out = np.asarray(f(x, grid, rbg(10)), np.float64)
    se = C**2 * np.sqrt(2.0 / (n - 1))
    assert abs(out.mean()) < 5 * C / np.sqrt(n)
    assert abs(out.var(ddof=1) - C**2) < 5 * se + 0.04 * C**2, out.var(ddof=1) / C**2
    assert np.asarray(f(x, grid, rbg(10), s_noise=0.0)).var() < 0.1 * C**2
