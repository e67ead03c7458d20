"""reverse_sde_pc: reverse-SDE Euler-Maruyama predictor + Langevin corrector (Song et al. 2021).

Checks: the SDE coefficients (f, g^2) against the paper's closed forms; on Gaussian data
x0 ~ N(0, c^2) the Euler-Maruyama chain is linear-Gaussian, so its output variance is known
exactly (propagated below in float64 from the paper's VP / VE coefficients, independently of the
sampler's code): the Monte Carlo variance matches it, and it tends to c^2 as the steps shrink;
the Langevin corrector moves a coarse run's variance toward c^2; alpha = 0 starts raise.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from jaxdiff.samplers.sde import sde_coefficients
from tests.samplers.gaussian import gaussian_denoiser

C = 0.5
KEY = jax.random.key(11, impl="rbg")
VPL = P.VPLinear()
EDM = P.EDM()


@functools.lru_cache(maxsize=None)
def compiled(n_corrector):
    def run(x, grid, key, c):
        return samplers.reverse_sde_pc(gaussian_denoiser(grid.process, c), x, grid, key=key, n_corrector=n_corrector)

    return jax.jit(run)


def test_sde_coefficients_closed_form():
    """VP (Song et al. 2021, Eq. 32): f = -beta(t) / 2, g^2 = beta(t); VE (Eq. 30):
    f = 0, g^2 = d sigma^2 / dt = 2 sigma^2 log(sigma_max / sigma_min); EDM: g^2 = 2 t."""
    t = jnp.asarray([0.05, 0.3, 0.7, 1.0])
    f, g2 = sde_coefficients(VPL, t, VPL.alpha(t), VPL.sigma(t))
    beta = VPL.beta_min + np.asarray(t) * (VPL.beta_max - VPL.beta_min)
    np.testing.assert_allclose(np.asarray(f), -beta / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g2), beta, rtol=2e-4)
    ve = P.VE()
    f, g2 = sde_coefficients(ve, t, ve.alpha(t), ve.sigma(t))
    np.testing.assert_allclose(np.asarray(f), 0.0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g2), 2 * np.asarray(ve.sigma(t)) ** 2 * np.log(ve.sigma_max / ve.sigma_min),
                               rtol=1e-4)
    te = jnp.asarray([0.01, 1.0, 80.0])
    f, g2 = sde_coefficients(EDM, te, EDM.alpha(te), EDM.sigma(te))
    np.testing.assert_allclose(np.asarray(g2), 2 * np.asarray(te), rtol=1e-6)


def _exact_em_variance(grid, kind, c=C):
    """Variance after Euler-Maruyama on the reverse SDE from the exact marginal, then x0_hat at the
    last step (x0 ~ N(0, c^2), exact score), in float64 with the paper's coefficients."""
    t = np.asarray(grid.t, np.float64)
    if kind == "vp_linear":
        beta = lambda u: VPL.beta_min + u * (VPL.beta_max - VPL.beta_min)  # noqa: E731
        la = lambda u: -0.25 * u**2 * (VPL.beta_max - VPL.beta_min) - 0.5 * u * VPL.beta_min  # noqa: E731
        alpha = lambda u: np.exp(la(u))  # noqa: E731
        f = lambda u: -beta(u) / 2  # noqa: E731
        g2 = beta
    else:  # EDM: alpha = 1, sigma = t, f = 0, g^2 = 2 t
        alpha, f, g2 = (lambda u: 1.0), (lambda u: 0.0), (lambda u: 2.0 * u)
    sig = lambda u: np.sqrt(1 - alpha(u) ** 2) if kind == "vp_linear" else u  # noqa: E731
    marg = lambda u: alpha(u) ** 2 * c**2 + sig(u) ** 2  # noqa: E731
    v = marg(t[0])
    for i in range(len(t) - 1):
        if i == len(t) - 2:  # into sigma = 0: x0_hat = k x
            k = alpha(t[i]) * c**2 / marg(t[i])
            return k**2 * v
        dt = t[i + 1] - t[i]
        m = 1 + (f(t[i]) + g2(t[i]) / marg(t[i])) * dt  # score = -x / marg
        v = m**2 * v + g2(t[i]) * abs(dt)
    return v


CASES = {"vp_linear": lambda n: S.make_grid(VPL, n, "uniform"), "edm": lambda n: S.make_grid(EDM, n, "karras")}


@pytest.mark.parametrize("kind,steps", [("vp_linear", 15), ("edm", 30)])
def test_euler_maruyama_variance(kind, steps):
    """Monte Carlo variance of reverse_sde_pc(n_corrector=0) = the exact variance of the EM chain
    (17% / 20% above c^2 at these step counts, so the match is sharp); the exact variance tends to
    c^2 as the steps shrink (the scheme converges to the reverse SDE, whose marginal is the data's)."""
    grid = CASES[kind](steps)
    n = 20000
    x = jnp.sqrt(grid.alpha[0] ** 2 * C**2 + grid.sigma[0] ** 2) * jax.random.normal(jax.random.key(12), (n, 1))
    out = np.asarray(compiled(0)(x, grid, KEY, C), np.float64)
    exact = _exact_em_variance(grid, kind)
    se = exact * np.sqrt(2.0 / (n - 1))
    assert abs(out.mean()) < 5 * np.sqrt(exact / n)
    assert abs(out.var(ddof=1) - exact) < 5 * se, (out.var(), exact, C**2)
    assert abs(exact - C**2) > 10 * se  # the check above tells 30 steps from the limit ...
    fine = _exact_em_variance(CASES[kind](3000), kind)
    assert abs(fine - C**2) < 0.01 * C**2, (fine, C**2)  # ... which is the data variance


def test_corrector_moves_toward_target():
    """EDM, 30 steps, same keys: three Langevin corrector steps per step cut the variance error of
    plain Euler-Maruyama (about +20%) by more than half; one step already reduces it."""
    grid = CASES["edm"](30)
    n = 20000
    x = grid.sigma[0] * jnp.sqrt(1.0 + C**2 / grid.sigma[0] ** 2) * jax.random.normal(jax.random.key(13), (n, 1))
    errs = {m: abs(float(np.asarray(compiled(m)(x, grid, KEY, C), np.float64).var()) - C**2) for m in (0, 1, 3)}
    se = C**2 * np.sqrt(2.0 / n)
    assert errs[0] > 10 * se, errs
    assert errs[3] < 0.5 * errs[0], errs
    assert errs[1] < errs[0] - 3 * se, errs


def test_alpha_zero_start_raises_and_validation():
    den = gaussian_denoiser(P.RectifiedFlow())
    x = jnp.ones((2, 3))
    for grid in (S.make_grid(P.RectifiedFlow(), 5), S.make_grid(P.discrete_vp(rescale_betas_zero_snr=True), 5,
                                                                 "trailing")):
        with pytest.raises(ValueError, match="reverse_sde_pc: the grid starts at alpha = 0"):
            samplers.reverse_sde_pc(den, x, grid, key=KEY)
    grid = S.make_grid(EDM, 5)
    with pytest.raises(ValueError, match="stochastic: pass key"):
        samplers.reverse_sde_pc(den, x, grid)
    with pytest.raises(ValueError, match="n_corrector must be an integer >= 0"):
        samplers.reverse_sde_pc(den, x, grid, key=KEY, n_corrector=-1)
    fn = samplers.get("reverse_sde_pc")
    assert fn is samplers.reverse_sde_pc and fn.stochastic is True and fn.order == 1


def test_bfloat16_vmap_grad_keys():
    grid = S.make_grid(EDM, 6)
    f = compiled(1)
    x = grid.prior_sample(jax.random.key(14), (2, 3))
    out = f(x, grid, KEY, C)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(f(x, grid, KEY, C)))  # reproducible
    assert float(jnp.max(jnp.abs(out - f(x, grid, jax.random.key(15, impl="rbg"), C)))) > 1e-3
    outb = f(x.astype(jnp.bfloat16), grid, KEY, C)
    assert outb.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(outb.astype(jnp.float32))))
    xs = jnp.stack([x, 0.5 * x])
    vm = jax.vmap(lambda v: f(v, grid, KEY, C))(xs)
    np.testing.assert_allclose(np.asarray(vm[1]), np.asarray(f(xs[1], grid, KEY, C)), rtol=1e-5, atol=1e-5)
    # Euler-Maruyama on Gaussian data is affine in x with the noise fixed: d sum(out)/dx = m
    g = compiled(0)
    m = (g(x, grid, KEY, C) - g(jnp.zeros_like(x), grid, KEY, C)) / x
    gx = jax.grad(lambda v: jnp.sum(g(v, grid, KEY, C)))(x)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(m), rtol=1e-3, atol=1e-6)
    gc = jax.grad(lambda c: jnp.sum(f(x, grid, KEY, c)))(C)  # through the corrector too
    assert np.isfinite(float(gc)) and float(gc) != 0.0
