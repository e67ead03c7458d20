"""Time grids: diffusers' timestep spacings, Karras sigmas, Grid invariants and make_grid defaults."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import schedules as S

PROCESSES = {
    "discrete": P.discrete_vp("scaled_linear", beta_start=0.00085, beta_end=0.012),
    "discrete_cosine": P.discrete_vp("squaredcos_cap_v2"),
    "vp_linear": P.VPLinear(),
    "vp_cosine": P.VPCosine(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "rectified_flow": P.RectifiedFlow(),
}

STEP_COUNTS = [1, 3, 7, 10, 25, 50, 333, 1000]
N = 12  # one grid size for most tests: eager ops compile once per shape and are reused


@pytest.mark.parametrize("spacing,offset", [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)])
def test_discrete_timesteps_match_diffusers(spacing, offset):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ddpm = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    for k in STEP_COUNTS:
        ours = S.discrete_timesteps(1000, k, spacing, steps_offset=offset)
        ddim.set_timesteps(k)
        ddpm.set_timesteps(k)
        assert ours.dtype == np.int64 and ours.shape == (k,)
        np.testing.assert_array_equal(ours, ddim.timesteps.numpy(), err_msg=f"{spacing} k={k}")
        np.testing.assert_array_equal(ours, ddpm.timesteps.numpy(), err_msg=f"{spacing} k={k}")


def test_discrete_timesteps_by_hand():
    """Lin et al. 2024, Table 2 (1000 training steps, 10 sampling steps)."""
    np.testing.assert_array_equal(S.discrete_timesteps(1000, 10, "linspace"),
                                  [999, 888, 777, 666, 555, 444, 333, 222, 111, 0])
    np.testing.assert_array_equal(S.discrete_timesteps(1000, 10, "leading", steps_offset=1),
                                  [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    np.testing.assert_array_equal(S.discrete_timesteps(1000, 10, "trailing"),
                                  [999, 899, 799, 699, 599, 499, 399, 299, 199, 99])
    for spacing in S.TIMESTEP_SPACINGS:
        ts = S.discrete_timesteps(1000, 37, spacing)
        assert np.all(np.diff(ts) < 0) and ts.min() >= 0 and ts.max() <= 999


def test_discrete_timesteps_errors():
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        S.discrete_timesteps(1000, 0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        S.discrete_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="linspace, leading, trailing"):
        S.discrete_timesteps(1000, 10, "quadratic")


@pytest.mark.parametrize("n,smin,smax", [(2, 0.002, 80.0), (10, 0.002, 80.0), (18, 0.0292, 14.61), (64, 0.01, 50.0)])
def test_karras_sigmas_formula(n, smin, smax):
    """Karras et al. 2022, Eq. 5 with rho = 7, written out."""
    rho = 7.0
    i = np.arange(n, dtype=np.float64)
    expect = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    ours = S.karras_sigmas(n, smin, smax)
    np.testing.assert_allclose(ours, expect, rtol=1e-12)
    assert ours[0] == pytest.approx(smax) and ours[-1] == pytest.approx(smin)
    assert np.all(np.diff(ours) < 0)
    # rho = 1 is uniform in sigma
    np.testing.assert_allclose(S.karras_sigmas(n, smin, smax, rho=1.0), np.linspace(smax, smin, n), rtol=1e-10)


def _grid_kinds(name):
    proc = PROCESSES[name]
    kinds = [None, "karras", "uniform", "logsnr", "beta", "beta_sigmas"]
    if proc.discrete:
        kinds += list(S.TIMESTEP_SPACINGS)
    return [(name, k) for k in kinds]


GRID_CASES = [c for name in PROCESSES for c in _grid_kinds(name)]


@pytest.mark.parametrize("name,kind", GRID_CASES)
@pytest.mark.parametrize("num_steps", [1, N])
def test_grid_invariants(name, kind, num_steps):
    proc = PROCESSES[name]
    kw = {}
    if kind in ("karras", "logsnr", "beta_sigmas"):
        smin, smax = float(proc.sigma_ratio(proc.t_min)), float(proc.sigma_ratio(proc.t_max))
        if not 0 < smin < smax < np.inf:  # clean t_min (cosine, flow) or pure-noise t_max (flow)
            with pytest.raises(ValueError, match="pass sigma_min= and sigma_max="):
                S.make_grid(proc, num_steps, kind)
            kw = dict(sigma_min=0.01, sigma_max=20.0)
    g = S.make_grid(proc, num_steps, kind, **kw)
    t, a, s = (np.asarray(v) for v in (g.t, g.alpha, g.sigma))
    assert g.num_steps == num_steps and t.shape == a.shape == s.shape == (num_steps + 1,)
    assert t.dtype == a.dtype == s.dtype == np.float32
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(a)) and np.all(np.isfinite(s))
    # Ends at clean data.
    assert s[-1] == 0.0 and a[-1] == 1.0
    # Strictly decreasing in the noise level sigma / alpha, non-increasing in t.
    ratio = np.asarray(g.sigma_ratio)
    assert np.all(np.diff(ratio) < 0), ratio
    assert np.all(np.diff(t) <= 0), t
    assert np.all(s[:-1] > 0) and np.all(a >= 0)
    # The coefficients are the process's at the grid times (the clean end point excepted).
    np.testing.assert_allclose(np.asarray(proc.sigma_ratio(g.t[:-1])), ratio[:-1], rtol=2e-4)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_make_grid_defaults(name):
    proc = PROCESSES[name]
    n = N
    g = S.make_grid(proc, n)
    if proc.discrete:  # diffusers' "linspace" timesteps
        np.testing.assert_array_equal(np.asarray(g.t[:-1]), S.discrete_timesteps(1000, n, "linspace"))
        np.testing.assert_allclose(np.asarray(g.alpha[:-1]) ** 2,
                                   np.asarray(proc.alphas_cumprod)[S.discrete_timesteps(1000, n)], rtol=1e-5)
    elif isinstance(proc, (P.EDM, P.VE)):  # processes with a sigma range: Karras, rho = 7
        np.testing.assert_allclose(np.asarray(g.sigma_ratio[:-1]),
                                   S.karras_sigmas(n, proc.sigma_min, proc.sigma_max), rtol=1e-5)
    elif float(proc.sigma(proc.t_min)) == 0.0:  # clean t_min (cosine, flow): n uniform times, then 0
        np.testing.assert_allclose(np.asarray(g.t[:-1]), np.linspace(proc.t_max, proc.t_min, n + 1)[:-1], rtol=1e-6)
    else:  # uniform in t ending at t_min
        np.testing.assert_allclose(np.asarray(g.t[:-1]), np.linspace(proc.t_max, proc.t_min, n), rtol=1e-6)
    assert float(g.t[0]) == pytest.approx(proc.t_max)


def test_make_grid_errors():
    with pytest.raises(ValueError, match="needs a discrete process"):
        S.make_grid(P.EDM(), 10, "leading")
    with pytest.raises(ValueError, match="karras, uniform, logsnr"):
        S.make_grid(P.EDM(), 10, "bogus")
    with pytest.raises(ValueError, match="'zero' or 'last'"):
        S.grid_from_times(P.EDM(), [1.0, 0.5], final="bogus")
    with pytest.raises(ValueError, match="'zero' or 'last'"):
        S.grid_from_sigmas(P.EDM(), [1.0, 0.5], final="bogus")


def test_make_grid_sigma_range_override():
    g = S.make_grid(P.discrete_vp(), N, "karras", sigma_min=0.1, sigma_max=10.0, rho=3.0)
    np.testing.assert_allclose(np.asarray(g.sigma_ratio[:-1]), S.karras_sigmas(N, 0.1, 10.0, 3.0), rtol=1e-5)


@pytest.mark.parametrize("name", ["discrete", "vp_linear", "vp_cosine", "edm", "ve"])
def test_grid_from_sigmas(name):
    proc = PROCESSES[name]
    sig = S.karras_sigmas(N, 0.05, 10.0)
    g = S.grid_from_sigmas(proc, sig)
    np.testing.assert_allclose(np.asarray(g.sigma_ratio[:-1]), sig, rtol=1e-6)
    # t maps back to the requested noise level, and alpha, sigma are the process's there.
    np.testing.assert_allclose(np.asarray(proc.sigma_ratio(g.t[:-1])), sig, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g.alpha[:-1]), np.asarray(proc.alpha(g.t[:-1])), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(g.sigma[:-1]), np.asarray(proc.sigma(g.t[:-1])), rtol=1e-4)
    last = S.grid_from_sigmas(proc, sig, final="last")
    assert last.num_steps == N - 1 and float(last.sigma_ratio[-1]) == pytest.approx(0.05, rel=1e-6)


def test_grid_from_times_final():
    proc = PROCESSES["discrete"]
    ts = S.discrete_timesteps(1000, N, "trailing")
    g = S.grid_from_times(proc, ts)
    assert g.num_steps == N
    np.testing.assert_array_equal(np.asarray(g.t), list(ts) + [0])
    gl = S.grid_from_times(proc, ts, final="last")
    assert gl.num_steps == N - 1 and float(gl.sigma[-1]) > 0
    np.testing.assert_array_equal(np.asarray(gl.t), ts)


@pytest.mark.parametrize("name", ["discrete", "vp_linear", "vp_cosine", "edm"])
def test_logsnr_uniform_times(name):
    proc = PROCESSES[name]
    t_end = 0.05 if isinstance(proc, (P.VPCosine, P.RectifiedFlow)) else None
    ts = S.logsnr_uniform_times(proc, N - 1, t_end)
    lam = np.asarray(proc.logsnr(jnp.asarray(ts)), np.float64)
    assert ts.shape == (N,)
    np.testing.assert_allclose(np.diff(lam), np.full(N - 1, (lam[-1] - lam[0]) / (N - 1)), rtol=2e-3, atol=1e-3)
    assert lam[-1] > lam[0]
    np.testing.assert_allclose(ts[0], proc.t_max, rtol=1e-4)
    # make_grid's "logsnr" kind: N model evaluations uniform in log-SNR, then the clean point
    if t_end is None:
        g = S.make_grid(proc, N, "logsnr")
        np.testing.assert_allclose(np.asarray(g.t[:-1]), ts, rtol=1e-3, atol=1e-5)


def test_logsnr_uniform_times_needs_finite_logsnr():
    with pytest.raises(ValueError, match="finite"):
        S.logsnr_uniform_times(P.RectifiedFlow(), 10)  # logsnr = -inf at t = 1


def test_uniform_times():
    np.testing.assert_allclose(S.uniform_times(P.VPLinear(), 4), [1.0, 0.75025, 0.5005, 0.25075, 0.001])
    np.testing.assert_allclose(S.uniform_times(P.RectifiedFlow(), 4, t_end=0.2), [1.0, 0.8, 0.6, 0.4, 0.2])


def test_grid_is_pytree_and_jittable():
    g = S.make_grid(PROCESSES["edm"], N)
    leaves, treedef = jax.tree_util.tree_flatten(g)
    assert len(leaves) == 3
    g2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert g2.process == g.process
    f = jax.jit(lambda grid: jnp.sum(grid.sigma_ratio[:-1]))
    np.testing.assert_allclose(f(g), np.sum(np.asarray(g.sigma_ratio[:-1])), rtol=1e-6)
    doubled = jax.tree_util.tree_map(lambda v: 2 * v, g)
    assert isinstance(doubled, S.Grid) and float(doubled.t[0]) == 160.0
    assert dataclasses.replace(g, t=g.t + 0).num_steps == N


def test_prior_sample():
    g = S.make_grid(PROCESSES["edm"], N)
    x = g.prior_sample(jax.random.key(0), (4000, 8))
    assert x.shape == (4000, 8) and x.dtype == jnp.float32
    assert abs(float(jnp.std(x)) / 80.0 - 1) < 0.02
    xb = g.prior_sample(jax.random.key(0), (3,), jnp.bfloat16)
    assert xb.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# Beta-quantile grids (Lee et al. 2024) and zero-terminal-SNR grids.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(0.6, 0.6), (0.5, 2.0), (2.0, 0.5), (1.0, 1.0), (3.0, 7.0), (0.2, 0.3)])
def test_beta_ppf_matches_scipy(a, b):
    stats = pytest.importorskip("scipy.stats")
    q = np.linspace(0.0, 1.0, 201)
    np.testing.assert_allclose(S.beta_ppf(q, a, b), stats.beta.ppf(q, a, b), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="a > 0 and b > 0"):
        S.beta_ppf(q, 0.0, b)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        S.beta_ppf([1.5], a, b)


@pytest.mark.parametrize("name", ["edm", "vp_linear", "discrete", "rectified_flow"])
def test_beta_grid(name):
    """make_grid(kind="beta"): N model times at t_end + ppf(1 - i / (N - 1)) (t_max - t_end) of
    Beta(0.6, 0.6) (scipy's quantiles), from t_max, then the clean point; dense near both ends."""
    stats = pytest.importorskip("scipy.stats")
    proc = PROCESSES[name]
    g = S.make_grid(proc, N, "beta")
    clean_tmin = float(proc.sigma(proc.t_min)) == 0.0
    m = N + 1 if clean_tmin else N  # flows: N + 1 quantiles, the last (t_min, clean) dropped
    q = stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, m), 0.6, 0.6)
    expect = proc.t_min + q * (proc.t_max - proc.t_min)
    expect = expect[:-1] if clean_tmin else expect
    t = np.asarray(g.t)
    assert g.num_steps == N and t.shape == (N + 1,)
    np.testing.assert_allclose(t[:-1], expect, rtol=1e-6, atol=1e-6 * proc.t_max)
    assert t[0] == pytest.approx(proc.t_max) and float(g.sigma[-1]) == 0.0 and float(g.alpha[-1]) == 1.0
    assert np.all(np.diff(t[:-1]) < 0)
    gaps = -np.diff(t[:m - 1] if clean_tmin else t[:-1])
    assert gaps[0] < gaps[len(gaps) // 2] and gaps[-1] < gaps[len(gaps) // 2]  # dense at both ends
    # other shape parameters
    g2 = S.make_grid(proc, N, "beta", beta_a=2.0, beta_b=0.5)
    q2 = stats.beta.ppf(1.0 - np.linspace(0.0, 1.0, m), 2.0, 0.5)
    e2 = proc.t_min + q2 * (proc.t_max - proc.t_min)
    np.testing.assert_allclose(np.asarray(g2.t[:-1]), e2[:-1] if clean_tmin else e2, rtol=1e-6, atol=1e-6 * proc.t_max)


@pytest.mark.parametrize("n", [2, 10, 25])
def test_beta_sigmas_match_diffusers(n):
    """kind="beta_sigmas" is diffusers' use_beta_sigmas (EulerDiscreteScheduler; its sigmas are
    sigma / alpha), Stable Diffusion's schedule. (For one step diffusers' range collapses to
    sigma_min: its single timestep is 0.)"""
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             use_beta_sigmas=True)
    sched.set_timesteps(n)
    g = S.make_grid(PROCESSES["discrete"], n, "beta_sigmas")
    np.testing.assert_allclose(np.asarray(g.sigma_ratio), sched.sigmas.numpy(), rtol=2e-5)


def test_zero_terminal_snr_grids():
    """Lin et al. 2024: discrete_vp(rescale_betas_zero_snr=True) has alpha = 0 at t = 999, reached
    by trailing / linspace / beta grids (not leading); flows start at alpha = 0 at t = 1."""
    zsnr = P.discrete_vp(rescale_betas_zero_snr=True)
    for kind in ("trailing", "linspace", "beta"):
        g = S.make_grid(zsnr, N, kind)
        assert float(g.t[0]) == 999.0 and float(g.alpha[0]) == 0.0 and float(g.sigma[0]) == 1.0, kind
        assert S.starts_at_alpha_zero(g)
        assert np.all(np.isfinite(np.asarray(g.alpha))) and np.all(np.diff(np.asarray(g.alpha)) > 0)
    assert not S.starts_at_alpha_zero(S.make_grid(zsnr, N, "leading"))
    assert not S.starts_at_alpha_zero(S.make_grid(PROCESSES["discrete"], N, "trailing"))
    assert S.starts_at_alpha_zero(S.make_grid(P.RectifiedFlow(), N))
    # traced grids are not inspected
    traced = jax.jit(lambda g: jnp.asarray(S.starts_at_alpha_zero(g)))(S.make_grid(zsnr, N, "trailing"))
    assert not bool(traced)


_NO_ALPHA_ZERO = ("pndm", "plms", "reverse_sde_pc")


def test_samplers_that_cannot_start_at_alpha_zero_raise():
    from jaxdiff import samplers

    g = S.make_grid(P.discrete_vp(rescale_betas_zero_snr=True), 5, "trailing")  # pndm needs >= 5 steps
    x = jnp.ones((2, 3))
    for name in _NO_ALPHA_ZERO:
        run = lambda x: samplers.get(name)(lambda v, t: v, x, g, key=jax.random.key(0))  # noqa: E731
        # eagerly, and under jit with the grid closed over (as the README calls samplers)
        for call in (run, jax.jit(run)):
            with pytest.raises(ValueError, match=f"{name}: the grid starts at alpha = 0.*every registered sampler "
                                                 "except pndm, plms and reverse_sde_pc"):
                call(x)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_make_grid_refuses_a_step_count_below_one(bad):
    for proc in (P.VPLinear(), P.EDM(), P.RectifiedFlow(), P.discrete_vp()):
        with pytest.raises(ValueError, match="num_steps must be a positive integer"):
            S.make_grid(proc, bad)


@pytest.mark.slow
def test_every_other_sampler_steps_from_alpha_zero():
    """Every registered sampler but those above is finite from a zero-terminal-SNR start, and its
    deterministic ones land near the exact PF-ODE end point, c x for Gaussian data from N(0, 1)."""
    from jaxdiff import samplers

    proc = P.discrete_vp(rescale_betas_zero_snr=True)
    g = S.make_grid(proc, 20, "trailing")
    c = 0.5

    def den(v, t):
        a, s = proc.alpha(t), proc.sigma(t)
        return a * c**2 / (a**2 * c**2 + s**2) * v

    x = jax.random.normal(jax.random.key(1), (4, 4))
    for name in samplers.available():
        if name in _NO_ALPHA_ZERO:
            continue
        fn = samplers.get(name)
        out = np.asarray(fn(den, x, g, key=jax.random.key(2)), np.float64)
        assert np.all(np.isfinite(out)), name
        if not fn.stochastic and name != "ddpm":
            assert np.max(np.abs(out - c * np.asarray(x))) < 0.15 * np.max(np.abs(c * np.asarray(x))), name
