"""Samplers: registry, shapes and dtypes, jit / vmap / grad through the loop, determinism, and
accuracy on Gaussian data where the denoiser and the probability-flow ODE are known exactly.

For x0 ~ N(0, c^2 I) and x_t = alpha x0 + sigma eps, E[x0 | x_t] = alpha c^2 / (alpha^2 c^2 + sigma^2) x_t
and the PF-ODE maps x_t linearly: x(t) = x(t0) sqrt(alpha^2 c^2 + sigma^2)(t) / sqrt(...)(t0)
(in the VE frame x~ = x / alpha, s = sigma / alpha: x~(s) = x~(s0) sqrt(c^2 + s^2) / sqrt(c^2 + s0^2)).
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

NAMES = ["ddpm", "ddim", "euler", "heun", "dpmpp_2m"]
DETERMINISTIC = ["ddim", "euler", "heun", "dpmpp_2m"]
ODE_ORDER = {"euler": 1, "ddim": 1, "heun": 2, "dpmpp_2m": 2}
C = 0.5  # data standard deviation
# Keys use the "rbg" PRNG: samplers accept any typed key, and its noise compiles several times
# faster on CPU than threefry's; test_default_threefry_keys covers the default implementation.
KEY = jax.random.key(0, impl="rbg")
EDM = P.EDM()
EDM_GRID = S.make_grid(EDM, 6)


def nonlinear_denoiser(w):
    """A smooth nonlinear stand-in for a network (scalar t), parameterised by w."""

    def denoise(x, t):
        return jnp.tanh(w * x / (1.0 + t)) * (1.0 + 0.1 * jnp.cos(x))

    return denoise


def needs_key(name, kw):
    return name == "ddpm" or kw.get("eta", 0) != 0 or kw.get("s_churn", 0) != 0


def run(name, denoise, x, grid, key=KEY, **kw):
    """Eager call; the key is passed only where the sampler is stochastic."""
    return samplers.get(name)(denoise, x, grid, key=key if needs_key(name, kw) else None, **kw)


def compiled(name, model="gauss", **kw):
    """A jitted ``f(x, grid, key, p)`` running sampler ``name`` with the Gaussian denoiser of data
    std p, the nonlinear denoiser of weight p, or x0_hat = p x ("scaled"). Cached, so that tests
    sharing shapes share compiles."""
    return _compiled(name, model, tuple(sorted(kw.items())))


@functools.lru_cache(maxsize=None)
def _compiled(name, model, kw):
    kw = dict(kw)
    use_key = needs_key(name, kw)

    def f(x, grid, key, p):
        if model == "gauss":
            den = gaussian_denoiser(grid.process, p)
        elif model == "scaled":
            den = lambda x, t: p * x  # noqa: E731
        else:
            den = nonlinear_denoiser(p)
        return samplers.get(name)(den, x, grid, key=key if use_key else None, **kw)

    return jax.jit(f)


def ode_scale(grid, c=C):
    """Exact PF-ODE factor from the first to the last grid point for N(0, c^2) data."""
    a0, s0 = float(grid.alpha[0]), float(grid.sigma[0])
    a1, s1 = float(grid.alpha[-1]), float(grid.sigma[-1])
    return np.sqrt(a1**2 * c**2 + s1**2) / np.sqrt(a0**2 * c**2 + s0**2)


def rel(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - b)) / jnp.max(jnp.abs(b)))


# ------------------------------------------------------------------------------------------
# Registry and validation.
# ------------------------------------------------------------------------------------------


def test_registry():
    names = samplers.available()
    assert names == sorted(names) and set(NAMES) <= set(names)
    for name in NAMES:
        fn = samplers.get(name)
        assert callable(fn) and fn is getattr(samplers, name)
        assert fn.stochastic == (name == "ddpm")
        assert fn.order == ODE_ORDER.get(name, 1)
    with pytest.raises(ValueError, match="available: " + ", ".join(names)):
        samplers.get("no_such_sampler")


def test_register_custom_sampler():
    def mine(denoise, x, grid, *, key=None):
        return x

    try:
        samplers.register("identity_test", mine)
        assert "identity_test" in samplers.available() and samplers.get("identity_test") is mine
    finally:
        samplers._REGISTRY.pop("identity_test", None)
    assert "identity_test" not in samplers.available()


def test_validation_errors():
    den = gaussian_denoiser(EDM)
    x = jnp.ones((2, 3))
    for name in NAMES:
        with pytest.raises(TypeError, match="Grid"):
            run(name, den, x, {"t": EDM_GRID.t})
        with pytest.raises(TypeError, match="floating"):
            run(name, den, jnp.ones((2, 3), jnp.int32), EDM_GRID)
        one_point = S.Grid(t=EDM_GRID.t[:1], alpha=EDM_GRID.alpha[:1], sigma=EDM_GRID.sigma[:1], process=EDM)
        with pytest.raises(ValueError, match="at least 2 points"):
            run(name, den, x, one_point)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        samplers.ddpm(den, x, EDM_GRID)
    with pytest.raises(ValueError, match="eta != 0 is stochastic"):
        samplers.ddim(den, x, EDM_GRID, eta=1.0)
    for name in ("euler", "heun"):
        with pytest.raises(ValueError, match="stochastic: pass key"):
            samplers.get(name)(den, x, EDM_GRID, s_churn=1.0)
    for eta in (-1.0, 1.5):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            samplers.ddim(den, x, EDM_GRID, eta=eta, key=jax.random.key(0))
    for name in ("euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral"):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            samplers.get(name)(den, x, EDM_GRID, eta=-1.0, key=jax.random.key(0))


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2"])
def test_churn_switched_off_outside_its_range_adds_no_noise(name):
    """EDM churn (Karras et al. 2022, Alg. 2) with every sigma outside [s_tmin, s_tmax] has gamma = 0
    at every step: the sampler is the deterministic one up to float rounding of the differently
    compiled arithmetic (< 1e-5), also under jit -- no rounding residual of sigma_hat^2 - sigma^2
    turned into noise (which was ~1e-4 sigma per step)."""
    den = gaussian_denoiser(EDM, 0.7)
    x = EDM_GRID.prior_sample(jax.random.key(1), (4, 3))
    plain = jax.jit(lambda x: samplers.get(name)(den, x, EDM_GRID))(x)
    for off in ({"s_tmin": 1e9}, {"s_tmax": 0.0}):
        churned = jax.jit(lambda x: samplers.get(name)(den, x, EDM_GRID, s_churn=10.0, key=jax.random.key(3), **off))(x)
        np.testing.assert_allclose(churned, plain, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# Shapes, dtypes and JAX transformations.
# ------------------------------------------------------------------------------------------


X = EDM_GRID.prior_sample(jax.random.key(2), (2, 3, 2, 2))  # one shared shape: shared compiles


@pytest.mark.parametrize("name", NAMES)
def test_shape_dtype_and_eager_equals_jit(name):
    out = compiled(name)(X, EDM_GRID, KEY, C)
    assert out.shape == X.shape and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    xb = X.astype(jnp.bfloat16)
    outb = compiled(name)(xb, EDM_GRID, KEY, C)
    assert outb.shape == X.shape and outb.dtype == jnp.bfloat16
    assert rel(outb, out) < 5e-2  # close to the float32 run
    # eager (un-jitted) run equals the jitted one
    eager = run(name, nonlinear_denoiser(1.3), X, EDM_GRID)
    jitted = compiled(name, "nonlinear")(X, EDM_GRID, KEY, 1.3)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_initial_states(name):
    xs = jnp.stack([X, -X, 0.5 * X])
    f = compiled(name, "nonlinear")
    vm = jax.jit(jax.vmap(lambda x: f(x, EDM_GRID, KEY, 1.3)))(xs)
    assert vm.shape == xs.shape
    for i in range(xs.shape[0]):  # each vmapped lane equals the single run (same key, same noise)
        np.testing.assert_allclose(np.asarray(vm[i]), np.asarray(f(xs[i], EDM_GRID, KEY, 1.3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_the_loop(name):
    """On Gaussian data every sampler is affine in x: out = m x + (noise), so d sum(out)/dx = m;
    the gradient with respect to the denoiser's parameter c matches central differences."""
    f = compiled(name)
    loss = lambda x, c: jnp.sum(f(x, EDM_GRID, KEY, c) ** 2)  # noqa: E731
    gx, gc = jax.jit(jax.grad(lambda x, c: jnp.sum(f(x, EDM_GRID, KEY, c)) + loss(x, c), argnums=(0, 1)))(X, C)
    out = f(X, EDM_GRID, KEY, C)
    m = out - f(jnp.zeros_like(X), EDM_GRID, KEY, C)
    m = m / X
    assert bool(jnp.all(jnp.isfinite(gx))) and np.isfinite(float(gc)) and float(gc) != 0.0
    np.testing.assert_allclose(np.asarray(gx), np.asarray(m * (1.0 + 2.0 * out)), rtol=1e-3, atol=1e-5)
    h = 1e-3
    fd = (loss(X, C + h) - loss(X, C - h) + jnp.sum(f(X, EDM_GRID, KEY, C + h) - f(X, EDM_GRID, KEY, C - h))) / (2 * h)
    np.testing.assert_allclose(float(gc), float(fd), rtol=2e-2)


def test_determinism_and_keys():
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    for name in DETERMINISTIC:  # no key needed, and none is used
        f = compiled(name, "nonlinear")
        np.testing.assert_array_equal(np.asarray(f(X, EDM_GRID, k1, 1.3)), np.asarray(f(X, EDM_GRID, k2, 1.3)))
    for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0}), ("euler", {"s_churn": 10.0}), ("heun", {"s_churn": 10.0})):
        f = compiled(name, "nonlinear", **kw)
        a, a2, b = f(X, EDM_GRID, k1, 1.3), f(X, EDM_GRID, k1, 1.3), f(X, EDM_GRID, k2, 1.3)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(a2))
        assert float(jnp.max(jnp.abs(a - b))) > 1e-4, name
        assert bool(jnp.all(jnp.isfinite(a)))
        if name != "ddpm":  # noise changes the result
            assert float(jnp.max(jnp.abs(a - compiled(name, "nonlinear")(X, EDM_GRID, k1, 1.3)))) > 1e-4, name


def test_default_threefry_keys():
    """The default (threefry) keys work too: reproducible, and a different key differs."""
    k = jax.random.key(5)
    a = compiled("ddpm")(X, EDM_GRID, k, C)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(compiled("ddpm")(X, EDM_GRID, k, C)))
    assert float(jnp.max(jnp.abs(a - compiled("ddpm")(X, EDM_GRID, jax.random.key(6), C)))) > 1e-3


# ------------------------------------------------------------------------------------------
# Identities between samplers, and the PF-ODE end point, on several processes (incl. alpha = 0).
# ------------------------------------------------------------------------------------------

GRIDS = {
    "edm_karras": S.make_grid(EDM, 40),
    "flow_uniform": S.make_grid(P.RectifiedFlow(), 40),  # starts at alpha = 0
    "zero_snr_trailing": S.make_grid(P.discrete_vp(rescale_betas_zero_snr=True), 40, "trailing"),  # alpha = 0
}


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_sampler_identities_and_ode_end_point(grid_name):
    """Euler in the VE frame is DDIM (eta = 0); DDIM with eta = 1 is DDPM (same noise); from pure
    noise, 40 steps of every ODE sampler land near the exact PF-ODE end point."""
    grid = GRIDS[grid_name]
    x = jnp.asarray([[1.0, -2.0, 0.5, 0.1], [0.3, 1.5, -1.0, 2.2]]) * jnp.sqrt(
        grid.alpha[0] ** 2 * C**2 + grid.sigma[0] ** 2)
    outs = {name: compiled(name)(x, grid, KEY, C) for name in NAMES}
    for name, out in outs.items():
        assert bool(jnp.all(jnp.isfinite(out))), (grid_name, name)
    np.testing.assert_allclose(np.asarray(outs["euler"]), np.asarray(outs["ddim"]), rtol=1e-4, atol=1e-5)
    ddim1 = compiled("ddim", eta=1.0)(x, grid, KEY, C)
    np.testing.assert_allclose(np.asarray(ddim1), np.asarray(outs["ddpm"]), rtol=1e-4, atol=1e-5)
    # A sanity bound (the order test below is the precise check): at 40 steps the error is set by
    # the grid -- e.g. diffusers' discrete grids end with a large first-order jump to sigma = 0.
    exact = np.asarray(x) * ode_scale(grid)
    for name in ODE_ORDER:
        assert rel(outs[name], exact) < 0.1, (name, rel(outs[name], exact))


def test_one_step_into_zero_returns_x0_hat():
    den = nonlinear_denoiser(0.9)
    for grid in (EDM_GRID,):  # (alpha = 0 starts: test_sampler_identities_and_ode_end_point)
        idx = jnp.asarray([0, -1])
        one = S.Grid(t=grid.t[idx], alpha=grid.alpha[idx], sigma=grid.sigma[idx], process=grid.process)
        x0_hat = den(X, grid.t[0])
        for name in DETERMINISTIC:
            np.testing.assert_allclose(np.asarray(run(name, den, X, one)), np.asarray(x0_hat), rtol=1e-5, atol=1e-6)


def test_clip_denoised():
    """clip_denoised clips x0_hat (diffusers' clip_sample): the last step lands on it."""
    grid = S.make_grid(P.discrete_vp(), 5)
    x = 3.0 * X  # the "scaled" denoiser below returns 5 x: far outside [-1, 1]
    for name in ("ddpm", "ddim"):
        out = compiled(name, "scaled", clip_denoised=1.0)(x, grid, KEY, 5.0)
        assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6, name
    assert float(jnp.max(jnp.abs(compiled("ddim", "scaled")(x, grid, KEY, 5.0)))) > 1.5


# ------------------------------------------------------------------------------------------
# Convergence order on Gaussian data.
# ------------------------------------------------------------------------------------------


def _karras_last(proc, n, smin=0.002, smax=80.0):
    """n steps on Karras sigmas ending at sigma_min (no final jump to 0, which is exact here and
    would hide the error)."""
    return S.grid_from_sigmas(proc, S.karras_sigmas(n + 1, smin, smax), final="last")


def _pad(grid, num_steps):
    """Repeat the last point: zero-length steps, exact no-ops for every ODE sampler (checked), so
    all step counts share one compiled program."""
    k = num_steps + 1 - grid.t.shape[0]
    rep = lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], k)])  # noqa: E731
    return S.Grid(t=rep(grid.t), alpha=rep(grid.alpha), sigma=rep(grid.sigma), process=grid.process)


CONVERGENCE = {
    "edm": lambda n: _karras_last(EDM, n),
    "discrete_vp": lambda n: _karras_last(P.discrete_vp(), n, 0.03, 150.0),
    "rectified_flow": lambda n: S.grid_from_times(P.RectifiedFlow(), np.linspace(1.0, 0.02, n + 1), final="last"),
}
STEPS = [16, 32, 64, 128]


FAST_CONVERGENCE = {("edm", n) for n in ODE_ORDER} | {("rectified_flow", "heun")}


@pytest.mark.parametrize("case,name", [
    pytest.param(c, n, marks=() if (c, n) in FAST_CONVERGENCE else pytest.mark.slow)
    for c in CONVERGENCE for n in ODE_ORDER
])
def test_pf_ode_convergence_order(case, name):
    """Error at sigma_min vs the exact PF-ODE solution; log-log slope = the method's order."""
    x_start = jnp.asarray([[1.0, -0.5, 2.0, 0.3]])
    f = compiled(name)
    errs = []
    for n in STEPS:
        grid = CONVERGENCE[case](n)
        x = x_start * grid.sigma[0]
        exact = np.asarray(x, np.float64) * ode_scale(grid)
        out = np.asarray(f(x, _pad(grid, STEPS[-1]), KEY, C), np.float64)
        errs.append(np.max(np.abs(out - exact)) / np.max(np.abs(exact)))
        if n == STEPS[0] and case == "edm":  # padding is a no-op
            np.testing.assert_allclose(out, np.asarray(f(x, grid, KEY, C)), rtol=1e-6)
    errs = np.asarray(errs)
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert abs(slope - ODE_ORDER[name]) < 0.3, (errs, slope)
    assert errs[-1] < (3e-2 if ODE_ORDER[name] == 1 else 2e-3), errs


# ------------------------------------------------------------------------------------------
# Ancestral sampling variance.
# ------------------------------------------------------------------------------------------


def _ddpm_variance(grid, c=C):
    """Exact variance after ancestral sampling of N(0, c^2) data with the exact denoiser, started
    from the exact marginal: the recursion is linear-Gaussian, so propagate it in float64."""
    a, s = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
    v = a[0] ** 2 * c**2 + s[0] ** 2
    for i in range(len(a) - 1):
        k = a[i] * c**2 / (a[i] ** 2 * c**2 + s[i] ** 2)
        a_ts = a[i] / a[i + 1]
        var_ts = s[i] ** 2 - a_ts**2 * s[i + 1] ** 2
        m = a_ts * s[i + 1] ** 2 / s[i] ** 2 + a[i + 1] * var_ts / s[i] ** 2 * k
        v = m**2 * v + var_ts * s[i + 1] ** 2 / s[i] ** 2
    return v


@pytest.mark.parametrize("num_steps,name,kw", [
    (1000, "ddpm", {}),
    pytest.param(1000, "ddim", {"eta": 1.0}, marks=pytest.mark.slow),
    pytest.param(10, "ddpm", {}, marks=pytest.mark.slow),
    pytest.param(10, "ddim", {"eta": 1.0}, marks=pytest.mark.slow),
])
def test_ancestral_sampling_variance(num_steps, name, kw):
    """ddpm and ddim(eta=1): Monte Carlo variance = the exact variance of the recursion, which
    tends to the data variance c^2 as the steps shrink (fixed_small variance undershoots at few)."""
    grid = S.make_grid(P.discrete_vp(), num_steps, "leading")
    n = 20000
    x = jnp.sqrt(grid.alpha[0] ** 2 * C**2 + grid.sigma[0] ** 2) * jax.random.normal(jax.random.key(8), (n,))
    exact_var = _ddpm_variance(grid)
    se = exact_var * np.sqrt(2.0 / (n - 1))
    out = np.asarray(compiled(name, **kw)(x, grid, jax.random.key(9, impl="rbg"), C), np.float64)
    assert abs(out.mean()) < 5 * np.sqrt(exact_var / n), name
    assert abs(out.var(ddof=1) - exact_var) < 5 * se, (name, out.var(), exact_var)
    if num_steps == 1000:
        assert abs(exact_var - C**2) < 0.02 * C**2  # close to the data variance
        assert abs(out.var(ddof=1) - C**2) < 5 * se + 0.02 * C**2
    else:
        assert exact_var < 0.6 * C**2  # ... and the test can tell the difference
