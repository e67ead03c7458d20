"""Property-based tests (hypothesis) over processes, time grids and samplers.

For random valid configurations -- beta schedules with random ends (also rescaled to zero
terminal SNR, Lin et al. 2024), VE / EDM noise ranges, every grid kind, random step counts --
grids are finite and monotonic (t non-increasing, sigma / alpha strictly decreasing, ending at
clean data), and every sampler maps finite input to finite output with the input's shape and
dtype on the closed-form Gaussian denoiser E[x0 | x_t] = alpha c^2 / (alpha^2 c^2 + sigma^2) x_t.
Example counts are modest (20 + 20 + 10) so the module runs in well under a minute on 2 CPUs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from jaxdiff import processes as P  # noqa: E402
from jaxdiff import samplers  # noqa: E402
from jaxdiff import schedules as S  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def processes(draw):
    kind = draw(st.sampled_from(["discrete", "vp_linear", "vp_cosine", "ve", "edm", "rectified_flow"]))
    if kind == "discrete":
        schedule = draw(st.sampled_from(list(P.BETA_SCHEDULES)))
        start = draw(st.floats(1e-5, 1e-3))
        end = draw(st.floats(5e-3, 3e-2))
        n = draw(st.integers(50, 1000))
        ztsnr = draw(st.booleans())
        return P.discrete_vp(schedule, beta_start=start, beta_end=end, num_train_timesteps=n,
                             rescale_betas_zero_snr=ztsnr)
    if kind == "vp_linear":
        return P.VPLinear(beta_min=draw(st.floats(0.01, 1.0)), beta_max=draw(st.floats(5.0, 30.0)))
    if kind == "ve":
        return P.VE(sigma_min=draw(st.floats(1e-3, 0.1)), sigma_max=draw(st.floats(1.0, 100.0)))
    if kind == "edm":
        return P.EDM(sigma_min=draw(st.floats(1e-3, 0.05)), sigma_max=draw(st.floats(1.0, 160.0)))
    return {"vp_cosine": P.VPCosine, "rectified_flow": P.RectifiedFlow}[kind]()


def _grid(draw, proc, max_steps):
    kinds = ["karras", "uniform", "logsnr", "beta", "beta_sigmas"]
    if proc.discrete:
        kinds += list(S.TIMESTEP_SPACINGS)
    kind = draw(st.sampled_from(kinds))
    n = draw(st.integers(1, max_steps if not proc.discrete else min(max_steps, proc.num_train_timesteps)))
    kw = {}
    if kind in ("karras", "logsnr", "beta_sigmas"):
        smin, smax = float(proc.sigma_ratio(proc.t_min)), float(proc.sigma_ratio(proc.t_max))
        if not 0 < smin < smax < np.inf:  # clean t_min or pure-noise t_max: the range must be given
            lo = draw(st.floats(1e-3, 0.1))
            kw = dict(sigma_min=lo, sigma_max=lo * draw(st.floats(10.0, 1e4)))
    if kind in ("karras",):
        kw["rho"] = draw(st.floats(1.0, 10.0))
    if kind == "beta_sigmas" and n < 2:
        n = 2
    return S.make_grid(proc, n, kind, **kw), kind, n


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_grids_are_finite_and_monotonic(data):
    proc = data.draw(processes())
    grid, kind, n = _grid(data.draw, proc, 64)
    t, a, s = (np.asarray(v) for v in (grid.t, grid.alpha, grid.sigma))
    assert t.shape == a.shape == s.shape == (n + 1,) and t.dtype == a.dtype == s.dtype == np.float32
    assert np.isfinite(t).all() and np.isfinite(a).all() and np.isfinite(s).all(), (kind, t, a, s)
    assert np.all(np.diff(t) <= 0), (kind, t)
    assert a[-1] == 1.0 and s[-1] == 0.0  # ends at clean data
    assert np.all(a >= 0) and np.all(s[:-1] > 0)
    ratio = s / np.where(a > 0, a, 1.0)
    ratio = np.where(a > 0, ratio, np.inf)  # zero terminal SNR: alpha = 0 at the start
    assert np.all(np.diff(ratio) < 0), (kind, ratio)


@settings(max_examples=20, **SETTINGS)
@given(data=st.data())
def test_process_coefficients_finite_and_monotonic(data):
    proc = data.draw(processes())
    ts = np.sort(np.asarray(data.draw(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=16)), np.float64))
    t = jnp.asarray(proc.t_min + ts * (proc.t_max - proc.t_min), jnp.float32)
    a, s = np.asarray(proc.alpha(t)), np.asarray(proc.sigma(t))
    assert np.isfinite(a).all() and np.isfinite(s).all()
    assert np.all(a >= 0) and np.all(s >= 0)
    assert np.all(np.diff(a) <= 1e-6) and np.all(np.diff(s) >= -1e-6)  # more noise as t grows


C = 0.5  # the data's standard deviation


def _gaussian_denoiser(proc):
    def denoise(x, t):
        a, s = proc.alpha(t), proc.sigma(t)
        return (a * C**2 / (a**2 * C**2 + s**2)) * x

    return denoise


@settings(max_examples=10, **SETTINGS)
@given(data=st.data())
def test_samplers_finite_shape_and_dtype(data):
    name = data.draw(st.sampled_from(samplers.available()))
    proc = data.draw(processes())
    grid, _, _ = _grid(data.draw, proc, 8)
    shape = data.draw(st.sampled_from([(3,), (2, 4), (1, 2, 2, 1)]))
    dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]))
    key = jax.random.key(data.draw(st.integers(0, 2**16)), impl="rbg")
    x = (grid.sigma[0] + grid.alpha[0] * C) * jax.random.normal(jax.random.fold_in(key, 1), shape)
    x = x.astype(dtype)
    try:
        out = samplers.get(name)(_gaussian_denoiser(proc), x, grid, key=key)
    except ValueError as e:  # documented restrictions: pndm / plms cannot start at alpha = 0,
        if "alpha" not in str(e) and "num_steps >=" not in str(e):  # pndm needs >= 5 steps
            raise
        assume(False)
    assert out.shape == x.shape and out.dtype == x.dtype, (name, out.shape, out.dtype)
    assert np.isfinite(np.asarray(out, np.float32)).all(), (name, proc, grid.t, out)
