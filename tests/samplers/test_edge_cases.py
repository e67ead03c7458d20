"""Edge cases found in review: float64 mode, one-step PLMS, grids that end clean twice."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from tests.samplers.gaussian import gaussian_denoiser


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_runs_under_enable_x64_with_float32_state(order):
    """UniPC's order-2 predictor constant was a float64 array under jax_enable_x64, which made
    its lax.switch branches disagree in dtype (a TypeError for order >= 2)."""
    proc = P.EDM()
    grid = S.make_grid(proc, 6)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3), jnp.float32) * 80.0
    want = samplers.get("unipc")(gaussian_denoiser(proc), x, grid, order=order)
    with jax.enable_x64(True):
        got = samplers.get("unipc")(gaussian_denoiser(proc), x, grid, order=order)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_plms_needs_two_steps():
    """One PLMS step evaluates its trial point at sigma = 0 (eps = 0 / 0): refused, not NaN."""
    proc = P.EDM()
    den = gaussian_denoiser(proc)
    x = jnp.ones((1, 2)) * 80.0
    with pytest.raises(ValueError, match=r"plms: the grid needs at least 3 points \(2 step"):
        samplers.get("plms")(den, x, S.make_grid(proc, 1))
    assert np.all(np.isfinite(np.asarray(samplers.get("plms")(den, x, S.make_grid(proc, 2)))))


def test_times_that_already_end_clean_need_final_last():
    """linspace(1, 0, N) for rectified flow ends at sigma = 0: final='zero' would append a second
    clean point and the samplers would evaluate the model there (NaN for ddim, euler, ...)."""
    proc = P.RectifiedFlow()
    times = np.linspace(1.0, 0.0, 5)
    with pytest.raises(ValueError, match="already clean.*final='last'"):
        S.grid_from_times(proc, times)
    grid = S.grid_from_times(proc, times, final="last")
    assert grid.t.shape == (5,) and float(grid.sigma[-1]) == 0.0 and float(grid.sigma[-2]) > 0.0
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2))
    for name in ("ddim", "euler", "heun", "dpmpp_2m"):
        assert np.all(np.isfinite(np.asarray(samplers.get(name)(gaussian_denoiser(proc), x, grid)))), name
    with pytest.raises(ValueError, match="already clean"):
        S.grid_from_sigmas(P.EDM(), [80.0, 1.0, 0.0])


def test_default_one_step_discrete_grid_starts_at_t_max():
    """diffusers' linspace spacing puts a single step at t = 0 (sigma ~ 0.01 for DDPM's betas);
    the default grid of one step starts at t_max instead. An explicit kind keeps diffusers' rule."""
    proc = P.discrete_vp()
    one = S.make_grid(proc, 1)
    assert float(one.t[0]) == 999.0 and float(one.sigma[-1]) == 0.0
    assert float(S.make_grid(proc, 1, "linspace").t[0]) == 0.0
    np.testing.assert_array_equal(np.asarray(S.make_grid(proc, 5).t),
                                  np.asarray(S.make_grid(proc, 5, "linspace").t))


def test_float64_grid_is_refused_with_a_clear_message():
    proc = P.EDM()
    g = S.make_grid(proc, 4)
    with jax.enable_x64(True):
        g64 = S.Grid(t=g.t.astype(jnp.float64), alpha=g.alpha.astype(jnp.float64),
                     sigma=g.sigma.astype(jnp.float64), process=proc)
        x = jnp.ones((1, 2), jnp.float32)
        for name in ("dpmpp_2m", "euler", "unipc"):
            with pytest.raises(TypeError, match="grid.t is float64; the samplers run in float32"):
                samplers.get(name)(gaussian_denoiser(proc), x, g64)


def test_numpy_float64_grid_without_x64_and_grids_built_under_jit():
    """A hand-built grid of numpy float64 arrays is cast to float32 by jax when x64 is off, as
    before; grid building still works when traced (its clean-end check is skipped there)."""
    proc = P.EDM()
    g = S.make_grid(proc, 4)
    g64 = S.Grid(t=np.asarray(g.t, np.float64), alpha=np.asarray(g.alpha, np.float64),
                 sigma=np.asarray(g.sigma, np.float64), process=proc)
    x = jnp.ones((1, 2), jnp.float32) * 80.0
    np.testing.assert_allclose(np.asarray(samplers.get("euler")(gaussian_denoiser(proc), x, g64)),
                               np.asarray(samplers.get("euler")(gaussian_denoiser(proc), x, g)), rtol=1e-6)
    traced = jax.jit(lambda s: S.make_grid(P.discrete_vp(), 4).sigma.sum() + s)(1.0)
    assert float(traced) == pytest.approx(float(S.make_grid(P.discrete_vp(), 4).sigma.sum()) + 1.0)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_clip_denoised_zero_is_refused_not_all_zero_samples(name):
    proc = P.discrete_vp()
    grid = S.make_grid(proc, 4, "leading")
    den = lambda x, t: 0.5 * x  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (2, 3))
    for zero in (0.0, 0, np.float32(0)):
        with pytest.raises(ValueError, match="would clip x0_hat"):
            samplers.get(name)(den, x, grid, key=jax.random.key(1), clip_denoised=zero)
    out = samplers.get(name)(den, x, grid, key=jax.random.key(1), clip_denoised=1.0)
    assert float(jnp.abs(out).max()) > 0
