"""Forward processes: diffusers' beta schedules, the VP identity, log-SNR and its inverse, marginals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P

SCHEDULE_ARGS = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}

# Every process, with a name for test ids.
PROCESSES = {
    "discrete_linear": P.discrete_vp("linear"),
    "discrete_scaled_linear": P.discrete_vp("scaled_linear", beta_start=0.00085, beta_end=0.012),
    "discrete_cosine": P.discrete_vp("squaredcos_cap_v2"),
    "discrete_zero_snr": P.discrete_vp("scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       rescale_betas_zero_snr=True),
    "vp_linear": P.VPLinear(),
    "vp_cosine": P.VPCosine(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "rectified_flow": P.RectifiedFlow(),
}
VP_NAMES = [k for k, p in PROCESSES.items() if isinstance(p, (P.DiscreteVP, P.VPLinear, P.VPCosine))]


N_T = 256  # one array shape for every process: eager ops compile once and are reused


def interior_times(process):
    """N_T times strictly inside (t_min, t_max): there alpha, sigma > 0 and the log-SNR is finite."""
    if isinstance(process, P.DiscreteVP):
        # Integers and points between them, up to t_max - 2: with zero terminal SNR the log-SNR is
        # -inf at t_max and (linear interpolation towards -inf) on all of (t_max - 1, t_max].
        hi = process.t_max - 2
        t = np.concatenate([np.round(np.linspace(1, hi, N_T // 2)), np.linspace(1.37, hi - 0.63, N_T // 2)])
        return jnp.asarray(np.sort(t), jnp.float32)
    return jnp.asarray(np.linspace(process.t_min, process.t_max, N_T + 2)[1:-1], jnp.float32)


# ------------------------------------------------------------------------------------------
# diffusers parity of the discrete schedules.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", list(SCHEDULE_ARGS))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(schedule, zero_snr):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    kw = SCHEDULE_ARGS[schedule]
    ref = diffusers.DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr, **kw)
    proc = P.discrete_vp(schedule, rescale_betas_zero_snr=zero_snr, **kw)
    ours = np.asarray(proc.alphas_cumprod)
    theirs = ref.alphas_cumprod.numpy().astype(np.float64)
    assert ours.shape == (1000,)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
    betas = P.make_betas(schedule, **kw)
    if zero_snr:
        betas = P.rescale_zero_terminal_snr(betas)
    # diffusers rescales in float32 (cancellation near t = 0), we in float64: agree to 1e-6 absolute.
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=1e-5, atol=1e-5 if zero_snr else 1e-9)
    if zero_snr:
        assert ours[-1] == 0.0 and theirs[-1] == 0.0
        assert ours[0] > 0.99
    else:
        assert np.all(ours > 0)
    assert np.all(np.diff(ours) < 0)


def test_rescale_zero_terminal_snr_matches_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref

    betas = P.make_betas("scaled_linear", 0.00085, 0.012, 1000)
    ours = P.rescale_zero_terminal_snr(betas)
    theirs = ref(torch.tensor(betas, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
    assert ours[-1] == pytest.approx(1.0)  # last alpha_t = 0: zero terminal SNR
    ac = np.cumprod(1 - ours)
    assert ac[-1] == pytest.approx(0.0, abs=1e-15)
    # Lin et al. keep the first alpha_bar unchanged.
    assert math.sqrt(ac[0]) == pytest.approx(math.sqrt(1 - betas[0]), rel=1e-12)


def test_make_betas_values():
    np.testing.assert_allclose(P.make_betas("linear", 1e-4, 0.02, 1000)[[0, -1]], [1e-4, 0.02])
    b = P.make_betas("scaled_linear", 0.00085, 0.012, 1000)
    np.testing.assert_allclose(np.sqrt(b), np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000), rtol=1e-12)
    b = P.make_betas("squaredcos_cap_v2", num_train_timesteps=1000)
    assert b.max() <= 0.999 and b[-1] == pytest.approx(0.999)
    # Nichol & Dhariwal Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos((t/T + s)/(1 + s) pi/2)^2.
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.cumprod(1 - b)[:900], f(np.arange(1, 901) / 1000) / f(0), rtol=1e-10)
    with pytest.raises(ValueError, match="linear, scaled_linear, squaredcos_cap_v2"):
        P.make_betas("quadratic")


def test_trained_betas():
    betas = np.linspace(1e-3, 0.05, 50)
    proc = P.discrete_vp(trained_betas=betas)
    assert proc.num_train_timesteps == 50 and proc.t_max == 49.0
    np.testing.assert_allclose(proc.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)


def test_discrete_vp_exact_at_integers_and_loglinear_between():
    proc = PROCESSES["discrete_scaled_linear"]
    ac = np.asarray(proc.alphas_cumprod)
    t = interior_times(proc)
    ti = np.asarray(t)[np.asarray(t) == np.round(np.asarray(t))].astype(int)
    a2, s2 = np.asarray(proc.alpha(t)) ** 2, np.asarray(proc.sigma(t)) ** 2
    np.testing.assert_allclose(a2[np.isin(np.asarray(t), ti)], ac[ti], rtol=2e-6)
    np.testing.assert_allclose(s2[np.isin(np.asarray(t), ti)], 1 - ac[ti], rtol=2e-5)
    # Between integers the log-SNR is linear in t (k-diffusion's DiscreteSchedule, diffusers' _sigma_to_t).
    lam = np.log(ac) - np.log1p(-ac)
    expect = np.interp(np.asarray(t, np.float64), np.arange(1000), lam)
    np.testing.assert_allclose(np.asarray(proc.logsnr(t)), expect, rtol=1e-5, atol=1e-5)
    # Zero-terminal SNR: finite alpha = 0, sigma = 1 at the last step.
    z = PROCESSES["discrete_zero_snr"]
    assert float(z.alpha(999.0)) == 0.0 and float(z.sigma(999.0)) == 1.0
    assert float(z.logsnr(999.0)) == -np.inf
    assert np.isfinite(float(z.logsnr(998.0))) and float(z.alpha(998.0)) > 0


# ------------------------------------------------------------------------------------------
# Properties every process must have.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PROCESSES))
def test_alpha_sigma_positive_finite(name):
    proc = PROCESSES[name]
    t = interior_times(proc)
    a, s = np.asarray(proc.alpha(t)), np.asarray(proc.sigma(t))
    assert a.dtype == np.float32 and s.dtype == np.float32 and a.shape == t.shape
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(s))
    assert np.all(a > 0) and np.all(s > 0)
    # End points of the domain: finite and non-negative (sigma may be 0 at a clean t_min,
    # alpha may be 0 at a pure-noise t_max).
    for end in (proc.t_min, proc.t_max):
        ae, se = float(proc.alpha(end)), float(proc.sigma(end))
        assert np.isfinite(ae) and np.isfinite(se) and ae >= 0 and se >= 0 and ae + se > 0
    # t_max is noisier than t_min.
    assert float(proc.sigma_ratio(proc.t_max)) > 10 * float(proc.sigma_ratio(proc.t_min))


@pytest.mark.parametrize("name", VP_NAMES)
def test_variance_preserving(name):
    proc = PROCESSES[name]
    t = interior_times(proc)
    a, s = proc.alpha(t), proc.sigma(t)
    np.testing.assert_allclose(np.asarray(a**2 + s**2), 1.0, atol=2e-6)
    for end in (proc.t_min, proc.t_max):
        assert float(proc.alpha(end)) ** 2 + float(proc.sigma(end)) ** 2 == pytest.approx(1.0, abs=2e-6)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_logsnr_decreasing_and_consistent(name):
    proc = PROCESSES[name]
    t = interior_times(proc)
    lam = np.asarray(proc.logsnr(t), np.float64)
    assert np.all(np.isfinite(lam))
    assert np.all(np.diff(lam) < 0), "log-SNR must decrease strictly in t"
    a, s = np.asarray(proc.alpha(t), np.float64), np.asarray(proc.sigma(t), np.float64)
    np.testing.assert_allclose(lam, 2 * (np.log(a) - np.log(s)), rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(proc.sigma_ratio(t)), s / a, rtol=1e-5)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_t_from_logsnr_inverts_logsnr(name):
    proc = PROCESSES[name]
    t = interior_times(proc)
    back = np.asarray(proc.t_from_logsnr(proc.logsnr(t)))
    scale = max(abs(proc.t_min), abs(proc.t_max))
    np.testing.assert_allclose(back, np.asarray(t), rtol=1e-4, atol=1e-6 * scale)
    back = np.asarray(proc.t_from_sigma_ratio(proc.sigma_ratio(t)))
    np.testing.assert_allclose(back, np.asarray(t), rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_derivatives_match_finite_differences(name):
    proc = PROCESSES[name]
    if proc.discrete:
        pytest.skip("piecewise log-linear in t: derivative is not smooth at integers")
    t = interior_times(proc)
    da, ds = proc.derivatives(t)
    h = 1e-3 * (proc.t_max - proc.t_min)
    t64 = np.asarray(t, np.float64)
    # central differences in float64 from the closed forms, evaluated by the process itself in float32
    fd_a = (np.asarray(proc.alpha(t64 + h), np.float64) - np.asarray(proc.alpha(t64 - h), np.float64)) / (2 * h)
    fd_s = (np.asarray(proc.sigma(t64 + h), np.float64) - np.asarray(proc.sigma(t64 - h), np.float64)) / (2 * h)
    np.testing.assert_allclose(np.asarray(da), fd_a, rtol=2e-2, atol=1e-3 * np.abs(fd_a).max() + 1e-6)
    np.testing.assert_allclose(np.asarray(ds), fd_s, rtol=2e-2, atol=1e-3 * np.abs(fd_s).max() + 1e-6)


def test_discrete_derivatives():
    """Piecewise-linear log-SNR: d alpha/dt = alpha sigma^2 / 2 * slope of the interval below t."""
    proc = PROCESSES["discrete_cosine"]
    ac = np.asarray(proc.alphas_cumprod)
    lam = np.log(ac) - np.log1p(-ac)
    t = np.array([0.0, 1.0, 10.0, 10.5, 500.0, 998.25, 999.0])
    hi = np.clip(np.ceil(t).astype(int), 1, 999)
    slope = lam[hi] - lam[hi - 1]
    lam_t = np.interp(t, np.arange(1000), lam)
    a, s = np.sqrt(1 / (1 + np.exp(-lam_t))), np.sqrt(1 / (1 + np.exp(lam_t)))
    da, ds = proc.derivatives(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(da), 0.5 * a * s**2 * slope, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ds), -0.5 * s * a**2 * slope, rtol=1e-4)
    assert np.all(np.asarray(da) < 0) and np.all(np.asarray(ds) > 0)
    # between integers it is the derivative of the interpolant (autodiff agrees)
    tf = jnp.asarray([10.5, 500.5, 20.25, 30.75, 40.5, 600.5, 700.5])
    np.testing.assert_allclose(proc.derivatives(tf)[0], jax.vmap(jax.grad(proc.alpha))(tf), rtol=1e-3)
    np.testing.assert_allclose(proc.derivatives(tf)[1], jax.vmap(jax.grad(proc.sigma))(tf), rtol=1e-3)
    # zero terminal SNR: finite everywhere
    z = PROCESSES["discrete_zero_snr"]
    tz = jnp.asarray([0.0, 1.0, 2.0, 500.0, 997.5, 998.0, 999.0])
    assert np.all(np.isfinite(np.asarray(jnp.stack(z.derivatives(tz)))))


def test_closed_forms():
    t = jnp.asarray([0.1, 0.5, 0.9], jnp.float32)
    rf = P.RectifiedFlow()
    np.testing.assert_allclose(rf.alpha(t), 1 - t)
    np.testing.assert_allclose(rf.sigma(t), t)
    np.testing.assert_allclose(jnp.stack(rf.derivatives(t)), [[-1, -1, -1], [1, 1, 1]])
    edm = P.EDM()
    np.testing.assert_allclose(edm.sigma(t), t)
    np.testing.assert_allclose(edm.alpha(t), 1.0)
    np.testing.assert_allclose(edm.net_time(t), 0.25 * np.log(np.asarray(t)), rtol=1e-6)
    ve = P.VE(sigma_min=0.01, sigma_max=50.0)
    np.testing.assert_allclose(ve.sigma(t), 0.01 * 5000.0 ** np.asarray(t, np.float64), rtol=1e-5)
    vpl = P.VPLinear(beta_min=0.1, beta_max=20.0)
    tt = np.asarray(t, np.float64)
    # Song et al. 2021 Eq. 33: mean coefficient exp(-t^2 (b_max - b_min)/4 - t b_min / 2).
    np.testing.assert_allclose(vpl.alpha(t), np.exp(-tt**2 * 19.9 / 4 - tt * 0.05), rtol=1e-6)
    cos = P.VPCosine()
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2)  # noqa: E731
    np.testing.assert_allclose(cos.alpha(t), f(tt) / f(0.0), rtol=1e-6)
    np.testing.assert_allclose(cos.sigma(t), np.sqrt(1 - (f(tt) / f(0.0)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_marginal_mean_and_variance(name):
    """x_t = alpha x0 + sigma eps has mean alpha x0 and variance sigma^2 (Monte Carlo)."""
    proc = PROCESSES[name]
    n = 40000
    ts = jnp.asarray(np.asarray(interior_times(proc))[np.linspace(0, N_T - 1, 7).astype(int)])
    if proc.discrete:
        ts = jnp.asarray([1.0, 100.0, 250.0, 500.5, 700.0, 900.25, 990.0], jnp.float32)
    b = ts.shape[0]
    x0 = jnp.broadcast_to(jnp.linspace(-1.5, 2.0, b)[:, None], (b, n))
    eps = jax.random.normal(jax.random.key(1), (b, n))
    xt = np.asarray(proc.marginal(x0, ts, eps), np.float64)
    a, s = np.asarray(proc.alpha(ts), np.float64), np.asarray(proc.sigma(ts), np.float64)
    mean, var = xt.mean(axis=1), xt.var(axis=1, ddof=1)
    se_mean = s / math.sqrt(n)
    se_var = s**2 * math.sqrt(2.0 / (n - 1))
    assert np.all(np.abs(mean - a * np.asarray(x0[:, 0])) < 5 * se_mean + 1e-6)
    assert np.all(np.abs(var - s**2) < 5 * se_var + 1e-9)
    # Image-shaped x0: coefficients broadcast over trailing axes (rank promotion is strict in tests).
    x0i = jnp.ones((b, 3, 4, 4))
    out = proc.marginal(x0i, ts, jnp.zeros_like(x0i))
    np.testing.assert_allclose(np.asarray(out[:, 1, 2, 3]), a, rtol=1e-6)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_sample_t_in_domain(name):
    proc = PROCESSES[name]
    t = np.asarray(proc.sample_t(jax.random.key(3), (4096,)))
    assert t.shape == (4096,) and np.all(np.isfinite(t))
    if isinstance(proc, P.EDM):
        # ln sigma ~ N(-1.2, 1.2^2) (Karras et al. Table 1)
        ls = np.log(t)
        assert abs(ls.mean() + 1.2) < 5 * 1.2 / 64 and abs(ls.std() - 1.2) < 0.05
        return
    assert t.min() >= proc.t_min and t.max() <= proc.t_max
    if proc.discrete:
        np.testing.assert_array_equal(t, np.round(t))
        assert t.max() >= proc.t_max - 5 and t.min() <= 5
    else:
        assert abs(t.mean() - (proc.t_min + proc.t_max) / 2) < 0.05 * (proc.t_max - proc.t_min)


def test_make_process():
    assert isinstance(P.make_process({"name": "edm", "sigma_max": 10.0}), P.EDM)
    assert P.make_process({"name": "edm", "sigma_max": 10.0}).t_max == 10.0
    d = P.make_process({"name": "discrete_vp", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                        "beta_end": 0.012})
    assert d == PROCESSES["discrete_scaled_linear"] and hash(d) == hash(PROCESSES["discrete_scaled_linear"])
    with pytest.raises(ValueError, match="discrete_vp, edm, rectified_flow, ve, vp_cosine, vp_linear"):
        P.make_process({"name": "nope"})


def test_processes_are_static_under_jit():
    """Processes are hashable and usable as static arguments; methods trace."""
    proc = PROCESSES["discrete_cosine"]
    f = jax.jit(lambda p, t: p.alpha(t), static_argnums=0)
    np.testing.assert_allclose(f(proc, jnp.asarray(10.0)), proc.alpha(10.0))
    g = jax.jit(lambda t: PROCESSES["vp_cosine"].logsnr(t))
    assert np.isfinite(float(g(0.5)))


def test_cosine_sigma_and_inverse_near_t0_match_float64():
    # 1 - alpha^2 rounds to 0 in float32 near t = 0: sigma(1e-6) was 0 (SNR inf), sigma(1e-5)
    # 4% off, and t_from_sigma_ratio(0.002) (an EDM-size noise level) 2% off
    p = P.VPCosine()
    t = np.array([1e-6, 1e-5, 1e-4, 1e-2, 0.5, 0.99, 0.9946, 0.999], np.float64)
    phi0 = p.s / (1 + p.s) * np.pi / 2
    alpha = np.cos((t + p.s) / (1 + p.s) * np.pi / 2) / np.cos(phi0)
    sigma = np.sqrt(1 - alpha**2)
    np.testing.assert_allclose(np.asarray(p.sigma(jnp.asarray(t, jnp.float32))), sigma, rtol=2e-6)
    logsnr = 2 * np.log(alpha / sigma)
    np.testing.assert_allclose(np.asarray(p.t_from_logsnr(jnp.asarray(logsnr, jnp.float32))), t, rtol=3e-6)
    r = np.float64(0.002)
    lo, hi = 0.0, 0.5  # bisection in float64 for sigma / alpha = r
    for _ in range(200):
        mid = (lo + hi) / 2
        a = np.cos((mid + p.s) / (1 + p.s) * np.pi / 2) / np.cos(phi0)
        lo, hi = (mid, hi) if np.sqrt(1 - a * a) / a < r else (lo, mid)
    t_ref = (lo + hi) / 2
    assert float(p.t_from_sigma_ratio(jnp.float32(r))) == pytest.approx(t_ref, rel=1e-5)
    assert float(p.t_from_logsnr(-jnp.inf)) == pytest.approx(1.0) and float(p.t_from_logsnr(jnp.inf)) == 0.0


def test_zero_terminal_snr_inverse_of_minus_infinity_is_t_max():
    p = P.discrete_vp(rescale_betas_zero_snr=True)
    assert float(p.t_from_logsnr(-jnp.inf)) == 999.0
    assert float(p.sigma_ratio(p.t_from_sigma_ratio(jnp.inf))) == np.inf
    assert float(P.discrete_vp().t_from_logsnr(-jnp.inf)) == 999.0  # clipped to the last entry as before
