"""consistency_multistep (Song et al. 2023, Algorithm 1) with the exact consistency function.

For data x0 ~ N(0, c^2 I) the PF-ODE maps x_t linearly to its origin:
f(x, t) = c x / sqrt(alpha^2 c^2 + sigma^2). From the exact marginal, one step gives N(0, c^2)
exactly, and every re-noised point alpha x0 + sigma z is again on the exact marginal, so multistep
samples have the data variance too. The posterior mean (the Gaussian *denoiser*) is not a
consistency function: with it the same sampler collapses the variance, which shows the checks can
fail.
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
KEY = jax.random.key(3, impl="rbg")
GRIDS = {  # 4 steps each: one compile for all
    "edm_karras": S.make_grid(P.EDM(), 4),
    "flow_from_t1": S.make_grid(P.RectifiedFlow(), 4),  # starts at alpha = 0
    "zero_snr_trailing": S.make_grid(P.discrete_vp(rescale_betas_zero_snr=True), 4, "trailing"),  # alpha = 0
}


def consistency_fn(proc, c):
    def f(x, t):
        a, s = proc.alpha(t), proc.sigma(t)
        return c * x / jnp.sqrt(a**2 * c**2 + s**2)

    return f


@functools.lru_cache(maxsize=None)
def compiled(model):
    def run(x, grid, key, c):
        den = consistency_fn(grid.process, c) if model == "consistency" else gaussian_denoiser(grid.process, c)
        return samplers.consistency_multistep(den, x, grid, key=key)

    return jax.jit(run)


def _one_step(grid):
    idx = jnp.asarray([0, grid.t.shape[0] - 1])
    return S.Grid(t=grid.t[idx], alpha=grid.alpha[idx], sigma=grid.sigma[idx], process=grid.process)


def test_registry_and_key():
    fn = samplers.get("consistency_multistep")
    assert fn is samplers.consistency_multistep and fn.stochastic is True
    grid = GRIDS["edm_karras"]
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="stochastic: pass key"):
        fn(consistency_fn(grid.process, C), x, grid)
    # one step needs no key: it is f(x, t_0) exactly
    one = _one_step(grid)
    out = fn(consistency_fn(grid.process, C), x, one)
    np.testing.assert_allclose(np.asarray(out), C / np.sqrt(C**2 + float(grid.sigma[0]) ** 2), rtol=1e-6)


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_data_variance_one_and_multistep(grid_name):
    """Samples from the exact marginal at t_0: 1 step and 4 steps both give N(0, c^2) (Monte Carlo,
    5 standard errors); the posterior-mean denoiser in its place does not."""
    grid = GRIDS[grid_name]
    n = 20000
    x = jnp.sqrt(grid.alpha[0] ** 2 * C**2 + grid.sigma[0] ** 2) * jax.random.normal(jax.random.key(4), (n, 2))
    se = C**2 * np.sqrt(2.0 / (2 * n - 1))
    multi = np.asarray(compiled("consistency")(x, grid, KEY, C), np.float64)
    one = np.asarray(samplers.consistency_multistep(consistency_fn(grid.process, C), x, _one_step(grid)),
                     np.float64)
    for out in (one, multi):
        assert np.all(np.isfinite(out))
        assert abs(out.mean()) < 5 * C / np.sqrt(out.size)
        assert abs(out.var() - C**2) < 5 * se, (grid_name, out.var(), C**2)
    # the intermediate noise is fresh: the multistep sample is not the one-step one
    assert np.corrcoef(one.ravel(), multi.ravel())[0, 1] < 0.5
    # not a consistency function -> the variance is wrong (far more than the tolerance above)
    bad = np.asarray(compiled("posterior")(x, grid, KEY, C), np.float64)
    assert abs(bad.var() - C**2) > 20 * se


def test_steps_by_hand():
    """Algorithm 1 written out: x0 = f(x, t_i), then x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} z_i with
    z_i from jax.random.split(key, N)[i]; the last step (into the clean point) returns f's output."""
    grid = GRIDS["edm_karras"]
    f = consistency_fn(grid.process, C)
    x = grid.prior_sample(jax.random.key(5), (3, 2))
    keys = jax.random.split(KEY, grid.num_steps)
    xi = x
    for i in range(grid.num_steps):
        x0 = f(xi, grid.t[i])
        xi = grid.alpha[i + 1] * x0 + grid.sigma[i + 1] * jax.random.normal(keys[i], x.shape, jnp.float32)
    np.testing.assert_allclose(np.asarray(compiled("consistency")(x, grid, KEY, C)), np.asarray(xi), rtol=1e-5,
                               atol=1e-6)


def test_bfloat16_vmap_grad():
    grid = GRIDS["edm_karras"]
    f = compiled("consistency")
    x = grid.prior_sample(jax.random.key(6), (2, 3))
    out = f(x, grid, KEY, C)
    outb = f(x.astype(jnp.bfloat16), grid, KEY, C)
    assert outb.dtype == jnp.bfloat16 and float(jnp.max(jnp.abs(outb.astype(jnp.float32) - out))) < 5e-2
    xs = jnp.stack([x, 2.0 * x])
    vm = jax.vmap(lambda v: f(v, grid, KEY, C))(xs)
    np.testing.assert_allclose(np.asarray(vm[1]), np.asarray(f(xs[1], grid, KEY, C)), rtol=1e-5, atol=1e-6)
    # the output of the last step is f(x_{N-1}, t_{N-1}): linear in c with the noise fixed
    gc = jax.grad(lambda c: jnp.sum(f(x, grid, KEY, c)))(C)
    h = 1e-3
    fd = (jnp.sum(f(x, grid, KEY, C + h)) - jnp.sum(f(x, grid, KEY, C - h))) / (2 * h)
    assert float(gc) != 0.0
    np.testing.assert_allclose(float(gc), float(fd), rtol=1e-2)
