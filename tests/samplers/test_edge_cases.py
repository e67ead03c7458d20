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
