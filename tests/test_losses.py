"""diffusion_loss: exactly zero for the oracle network, weights, time densities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import losses as L
from jaxdiff import parameterization as PZ
from jaxdiff import processes as P

PROCESSES = {
    "discrete": P.discrete_vp("linear"),
    "vp_linear": P.VPLinear(),
    "vp_cosine": P.VPCosine(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "rectified_flow": P.RectifiedFlow(),
}
UNIT_T = ["vp_linear", "vp_cosine", "ve", "rectified_flow"]  # t in [0, 1]: logit_normal makes sense
SHAPE = (8, 2, 4, 4)
X0 = jax.random.normal(jax.random.key(7), SHAPE)
KEY = jax.random.key(11)


def bc(c):
    return jnp.reshape(c, (-1,) + (1,) * (len(SHAPE) - 1))


def d_alpha_sigma(proc, t):
    """d alpha/dt, d sigma/dt independently of Process.derivatives."""
    if isinstance(proc, P.DiscreteVP):
        # float64 from the table: the piecewise-linear log-SNR's slope on (ceil(t) - 1, ceil(t))
        ac = np.asarray(proc.alphas_cumprod)
        lam = np.log(ac) - np.log1p(-ac)
        tt = np.asarray(t, np.float64)
        hi = np.clip(np.ceil(tt).astype(int), 1, len(ac) - 1)
        slope = lam[hi] - lam[hi - 1]
        lam_t = np.interp(tt, np.arange(len(ac)), lam)
        a, s = np.sqrt(1 / (1 + np.exp(-lam_t))), np.sqrt(1 / (1 + np.exp(lam_t)))
        return jnp.asarray(0.5 * a * s**2 * slope, jnp.float32), jnp.asarray(-0.5 * s * a**2 * slope, jnp.float32)
    return jax.vmap(jax.grad(lambda u: proc.alpha(u)))(t), jax.vmap(jax.grad(lambda u: proc.sigma(u)))(t)


def true_target(pred, proc, x0, eps, t, x_in):
    """Target from its definition; for EDM the F that gives D = x0 from the fed input."""
    a, s = proc.alpha(t), proc.sigma(t)
    if pred == "epsilon":
        return eps
    if pred == "sample":
        return x0
    if pred == "v_prediction":
        return bc(a) * eps - bc(s) * x0
    if pred == "score":
        return -eps / bc(s)
    if pred == "velocity":
        da, ds = d_alpha_sigma(proc, t)
        return bc(da) * x0 + bc(ds) * eps
    if pred == "edm":
        c_skip, c_out, c_in, _ = PZ.edm_precond(s / a)
        x_tilde = x_in / bc(c_in)  # the net was fed c_in x~
        return (x0 - bc(c_skip) * x_tilde) / bc(c_out)
    raise AssertionError(pred)


def key_split_oracle(pred, proc, density, key, x0, offset=0.0, **kw):
    """A net that knows x0 and recomputes t, eps from the same key splits as diffusion_loss.

    It checks what it is fed against net_inputs and returns the exact target (+ offset).
    """
    k_t, k_eps = jax.random.split(key)
    t = L.sample_times(k_t, x0.shape[0], proc, density, **kw)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    x_t = bc(proc.alpha(t)) * x0 + bc(proc.sigma(t)) * eps
    exp_x_in, exp_t_in = PZ.net_inputs(pred, x_t, t, proc)

    def net(x_in, t_in):
        np.testing.assert_allclose(x_in, exp_x_in, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(exp_x_in))))
        np.testing.assert_allclose(t_in, exp_t_in, rtol=1e-6, atol=1e-7)
        return true_target(pred, proc, x0, eps, t, x_in) + offset

    return net, t, eps


def from_x0_oracle(pred, proc, x0):
    """A net that knows only x0: it recovers (x_t, t) from its inputs and applies from_x0."""

    def net(x_in, t_in):
        if pred == "edm":
            s = jnp.exp(4.0 * t_in)  # c_noise = ln(s) / 4
            t = proc.t_from_sigma_ratio(s)
            c_skip, c_out, c_in, _ = PZ.edm_precond(s)
            x_tilde = x_in / bc(c_in)
            return (x0 - bc(c_skip) * x_tilde) / bc(c_out)
        if isinstance(proc, P.DiscreteVP):
            t = t_in
        elif isinstance(proc, P.EDM):
            t = jnp.exp(4.0 * t_in)
        else:
            t = t_in / 1000.0
        return PZ.from_x0(pred, x0, x_in, t, proc)

    return net


def relative_loss(loss, target):
    """(Unweighted) loss divided by mean(target^2): a scale-free 'is it zero' measure per example."""
    scale = jnp.mean(target**2, axis=(1, 2, 3))
    return np.asarray(loss / scale)


def _cases():
    """(process, density) pairs; "uniform" only where it differs from the process's default."""
    out = []
    for name in PROCESSES:
        densities = ["default", "lognormal"] + (["logit_normal"] if name in UNIT_T else ["uniform"])
        if name in ("vp_cosine", "ve"):  # the same code paths as vp_linear: default density only
            densities = ["default"]
        out += [(name, d) for d in densities]
    return out


@pytest.mark.parametrize("name,density", _cases())
def test_loss_is_zero_for_exact_target_and_positive_otherwise(name, density):
    proc = PROCESSES[name]
    for pred in PZ.PREDICTIONS:
        net, t, eps = key_split_oracle(pred, proc, density, KEY, X0)
        target = true_target(pred, proc, X0, eps, t, PZ.net_inputs(pred, proc.marginal(X0, t, eps), t, proc)[0])
        for weighting in L.WEIGHTINGS:
            loss = L.diffusion_loss(net, X0, KEY, process=proc, prediction=pred, weighting=weighting,
                                    t_density=density)
            w = L.loss_weight(weighting, pred, t, proc)
            assert loss.shape == (SHAPE[0],)
            assert np.all(np.isfinite(np.asarray(w))) and np.all(np.asarray(w) > 0), (pred, weighting)
            rel = relative_loss(loss / w, target)
            assert np.all(rel < 1e-10), (pred, weighting, rel.max())
        # A wrong network: target + 0.1 everywhere. The loss is then exactly w * 0.01 in the
        # prediction's own space, and w * 0.01 c_out^2 for EDM (the error is scaled by c_out in D).
        wrong, _, _ = key_split_oracle(pred, proc, density, KEY, X0, offset=0.1)
        for weighting in L.WEIGHTINGS:
            loss = np.asarray(L.diffusion_loss(wrong, X0, KEY, process=proc, prediction=pred,
                                               weighting=weighting, t_density=density))
            w = np.asarray(L.loss_weight(weighting, pred, t, proc), np.float64)
            expect = 0.01 * w
            if pred == "edm":
                expect = expect * np.asarray(PZ.edm_precond(proc.sigma(t) / proc.alpha(t))[1], np.float64) ** 2
            assert np.all(loss > 0) and np.all(np.isfinite(loss)), (pred, weighting)
            np.testing.assert_allclose(loss, expect, rtol=2e-3, err_msg=f"{pred} {weighting}")


@pytest.mark.parametrize("name", list(PROCESSES))
def test_loss_is_zero_for_from_x0_oracle(name):
    """An oracle that only knows x0 and maps (x_t, t) -> target with from_x0 (float32 cancellation
    in eps = (x_t - alpha x0) / sigma at small sigma limits this to ~1e-8)."""
    proc = PROCESSES[name]
    for pred in PZ.PREDICTIONS:
        net = from_x0_oracle(pred, proc, X0)
        loss = L.diffusion_loss(net, X0, KEY, process=proc, prediction=pred)
        _, t, eps = key_split_oracle(pred, proc, "default", KEY, X0)
        x_in = PZ.net_inputs(pred, proc.marginal(X0, t, eps), t, proc)[0]
        rel = relative_loss(loss, true_target(pred, proc, X0, eps, t, x_in))
        assert np.all(rel < 1e-7), (pred, rel.max())
        wrong = L.diffusion_loss(lambda x, ti: 0.9 * net(x, ti), X0, KEY, process=proc, prediction=pred)
        assert np.all(np.asarray(wrong) > 1e3 * np.asarray(loss) + 1e-12), pred


def test_min_snr_weights():
    """Hang et al. 2023: eps-prediction w = min(SNR, gamma) / SNR; v-prediction min(SNR, gamma) / (SNR + 1)."""
    gamma = 5.0
    for proc in (P.discrete_vp("linear"), P.VPLinear(), P.VPCosine()):
        t = jnp.linspace(proc.t_min + 0.02 * (proc.t_max - proc.t_min), proc.t_max, 50)
        snr = np.asarray(proc.alpha(t), np.float64) ** 2 / np.asarray(proc.sigma(t), np.float64) ** 2
        assert snr.max() > gamma > snr.min()  # both branches of the min are exercised
        w_eps = np.asarray(L.loss_weight("min_snr", "epsilon", t, proc, min_snr_gamma=gamma))
        np.testing.assert_allclose(w_eps, np.minimum(snr, gamma) / snr, rtol=1e-4)
        w_v = np.asarray(L.loss_weight("min_snr", "v_prediction", t, proc, min_snr_gamma=gamma))
        np.testing.assert_allclose(w_v, np.minimum(snr, gamma) / (snr + 1), rtol=1e-4)
        w_x0 = np.asarray(L.loss_weight("min_snr", "sample", t, proc, min_snr_gamma=gamma))
        np.testing.assert_allclose(w_x0, np.minimum(snr, gamma), rtol=1e-4)
        # P2 (Choi et al. 2022 Eq. 8) in eps terms: 1 / (k + SNR)^gamma
        w_p2 = np.asarray(L.loss_weight("p2", "epsilon", t, proc, p2_gamma=0.5, p2_k=1.0))
        np.testing.assert_allclose(w_p2, 1.0 / (1.0 + snr) ** 0.5, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(L.loss_weight("none", "epsilon", t, proc)), 1.0)


def test_edm_weighting():
    """Karras et al. Eq. 8: lambda(sigma) = 1 / c_out^2 on D; unit weight on F."""
    proc = P.EDM()
    t = jnp.asarray([0.01, 0.3, 1.0, 10.0, 80.0])
    s = np.asarray(t, np.float64)
    w = np.asarray(L.loss_weight("edm", "edm", t, proc), np.float64)
    np.testing.assert_allclose(w, (s**2 + 0.25) / (s * 0.5) ** 2, rtol=1e-5)
    c_out = np.asarray(PZ.edm_precond(t)[1], np.float64)
    np.testing.assert_allclose(w * c_out**2, 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_x0_error_scale(name):
    """||out - target||^2 = r(t) ||x0_hat - x0||^2 at fixed x_t, for every prediction type."""
    proc = PROCESSES[name]
    lo, hi = proc.t_min, proc.t_max
    t = jnp.linspace(lo + 0.05 * (hi - lo), lo + 0.9 * (hi - lo), SHAPE[0])
    eps = jax.random.normal(jax.random.key(3), SHAPE)
    x_t = proc.marginal(X0, t, eps)
    delta = 0.01 * jax.random.normal(jax.random.key(4), SHAPE)
    for pred in PZ.PREDICTIONS:
        if pred == "edm":
            continue
        target = PZ.from_x0(pred, X0, x_t, t, proc)
        x0_hat = PZ.to_x0(pred, target + delta, x_t, t, proc)
        lhs = np.asarray(jnp.mean(delta**2, axis=(1, 2, 3)), np.float64)
        rhs = np.asarray(L.x0_error_scale(pred, t, proc), np.float64) * np.asarray(
            jnp.mean((x0_hat - X0) ** 2, axis=(1, 2, 3)), np.float64)
        np.testing.assert_allclose(rhs, lhs, rtol=2e-2, err_msg=pred)


def test_exact_target_matches_from_x0():
    proc = P.VPCosine()
    t = jnp.linspace(0.1, 0.9, SHAPE[0])
    eps = jax.random.normal(jax.random.key(5), SHAPE)
    x_t = proc.marginal(X0, t, eps)
    for pred in PZ.PREDICTIONS:
        a = L.exact_target(pred, X0, eps, t, proc)
        b = PZ.from_x0(pred, X0, x_t, t, proc)
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * float(jnp.max(jnp.abs(b))), pred


def test_time_densities():
    n = 8000
    k = jax.random.key(9)
    ln = np.asarray(L.sample_times(k, n, P.RectifiedFlow(), "logit_normal"))
    assert ln.min() > 0 and ln.max() < 1
    logit = np.log(ln) - np.log1p(-ln)  # SD3: logit(t) ~ N(0, 1)
    assert abs(logit.mean()) < 5 / math.sqrt(n) and abs(logit.std() - 1) < 0.03
    ln2 = np.asarray(L.sample_times(k, n, P.RectifiedFlow(), "logit_normal", mean=0.5, std=0.7))
    logit2 = np.log(ln2) - np.log1p(-ln2)
    assert abs(logit2.mean() - 0.5) < 0.03 and abs(logit2.std() - 0.7) < 0.03
    for proc in (P.EDM(), P.VPLinear(), P.discrete_vp("linear")):
        t = L.sample_times(k, n, proc, "lognormal")
        ls = np.log(np.asarray(proc.sigma_ratio(t), np.float64))  # ln(sigma/alpha) ~ N(-1.2, 1.2^2)
        inside = ls  # discrete VP clips to its table range; compare the median, robust to clipping
        assert abs(np.median(inside) + 1.2) < 0.05, type(proc).__name__
    u = np.asarray(L.sample_times(k, n, P.VE(), "uniform"))
    assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01
    # for continuous non-EDM processes "uniform" is the default density (same draws)
    np.testing.assert_array_equal(u, np.asarray(L.sample_times(k, n, P.VE(), "default")))
    d = np.asarray(L.sample_times(k, n, P.discrete_vp(), "default"))
    np.testing.assert_array_equal(d, np.round(d))
    with pytest.raises(ValueError, match="default, uniform, logit_normal, lognormal"):
        L.sample_times(k, 4, P.VE(), "beta")
    with pytest.raises(ValueError, match="none, min_snr, p2, edm"):
        L.loss_weight("snr", "epsilon", jnp.ones(2) * 0.5, P.VE())


def test_loss_jit_and_grad():
    proc = P.VPLinear()

    def loss(w):
        net = lambda x, t: w * x  # noqa: E731
        return jnp.mean(L.diffusion_loss(net, X0, KEY, process=proc, prediction="v_prediction", weighting="min_snr"))

    val, g = jax.jit(jax.value_and_grad(loss))(jnp.asarray(0.5))
    assert np.isfinite(float(val)) and float(val) > 0 and np.isfinite(float(g)) and float(g) != 0


# ------------------------------------------------------------------------------------------
# zero / infinite SNR endpoints
# ------------------------------------------------------------------------------------------

ZERO_SNR_DDPM = P.discrete_vp("linear", rescale_betas_zero_snr=True)
# times including alpha = 0 (zero SNR) and sigma = 0 (infinite SNR) where the process has them:
# zero-SNR DDPM at t_max = 999 and inside (998, 999] (alpha = 0 on that whole interval),
# rectified flow at 0 and 1, the VP processes and EDM at t = 0 (sigma = 0), plus t_min/t_max and
# the first step 1/T of a 1000-step grid.
ENDPOINTS = {
    "discrete_zero_snr": (ZERO_SNR_DDPM, [0.0, 1.0, 998.0, 998.5, 999.0]),
    "vp_cosine": (P.VPCosine(), [0.0, 1e-3, 0.9946]),
    "rectified_flow": (P.RectifiedFlow(), [0.0, 1e-3, 1.0 - 1e-3, 1.0]),
    "vp_linear": (P.VPLinear(), [0.0, 1e-3, 1.0]),
    "edm": (P.EDM(), [0.0, 0.002, 80.0]),
    "ve": (P.VE(), [0.0, 1.0]),
}
# (id, weighting, hyper-parameters): P2's SNR^(1 - gamma) limit at sigma = 0 is +inf, 1 or 0 for
# gamma < 1, = 1, > 1, so all three are covered
WEIGHT_CASES = [
    ("none", "none", {}),
    ("min_snr", "min_snr", {}),
    ("min_snr_g1", "min_snr", {"min_snr_gamma": 1.0}),
    ("p2", "p2", {}),
    ("p2_g0.5", "p2", {"p2_gamma": 0.5}),
    ("p2_g2_k0.5", "p2", {"p2_gamma": 2.0, "p2_k": 0.5}),
    ("edm", "edm", {}),
    ("edm_sd0.7", "edm", {"sigma_data": 0.7}),
]
_W_IDS = [c[0] for c in WEIGHT_CASES]


def old_loss_weight(weighting, prediction, t, process, *, min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0,
                    sigma_data=0.5):
    """loss_weight as first written: w0(SNR) / x0_error_scale (NaN at zero / infinite SNR)."""
    if weighting == "none":
        return jnp.ones_like(jnp.asarray(t, jnp.float32))
    snr = jnp.exp(process.logsnr(t))
    r = L.x0_error_scale(prediction, t, process)
    if weighting == "min_snr":
        return jnp.minimum(snr, min_snr_gamma) / r
    if weighting == "p2":
        return snr / (r * (p2_k + snr) ** p2_gamma)
    s = process.sigma(t) / process.alpha(t)
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2 / r


def _geometry(proc, t):
    """alpha, sigma and dd = alpha' sigma - alpha sigma' in float64."""
    t = jnp.asarray(t, jnp.float32)
    a, s = np.asarray(proc.alpha(t), np.float64), np.asarray(proc.sigma(t), np.float64)
    da, ds = (np.asarray(v, np.float64) for v in proc.derivatives(t))
    with np.errstate(invalid="ignore"):
        dd = da * s - a * ds
    return a, s, dd


def endpoint_weight(weighting, pred, a, s, dd, min_snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0, sigma_data=0.5):
    """The weight at alpha = 0 (SNR = 0) or sigma = 0 (SNR = inf), worked out by hand as the limit of
    w0(SNR) / r(t); where that limit is +inf, or where dd = 0 (the velocity says nothing about x0),
    loss_weight documents 0. Returns (value, limit_is_infinite)."""
    pred = "sample" if pred == "edm" else pred
    g, gam, k, sd2 = min_snr_gamma, p2_gamma, p2_k, sigma_data**2
    if weighting == "none":
        return 1.0, False
    with np.errstate(divide="ignore"):  # the table is built whole: dd = 0 entries are not used
        return _endpoint_table(weighting, pred, a, s, dd, g, gam, k, sd2)


def _endpoint_table(weighting, pred, a, s, dd, g, gam, k, sd2):
    if a == 0:
        if pred == "velocity" and dd == 0:
            return 0.0, False
        w = {"min_snr": {"sample": 0.0, "epsilon": 1.0, "v_prediction": 0.0, "score": s**2, "velocity": 0.0},
             "p2": {"sample": 0.0, "epsilon": k**-gam, "v_prediction": 0.0, "score": s**2 * k**-gam,
                    "velocity": 0.0},
             "edm": {"sample": 1 / sd2, "epsilon": np.inf, "v_prediction": 1 / (sd2 * s**2), "score": np.inf,
                     "velocity": s**2 / (sd2 * dd**2)}}[weighting][pred]
    else:
        assert s == 0
        p2_x0 = 1.0 if gam == 1 else (0.0 if gam > 1 else np.inf)
        w = {"min_snr": {"sample": g, "epsilon": 0.0, "v_prediction": 0.0, "score": 0.0, "velocity": 0.0},
             "p2": {"sample": p2_x0, "epsilon": 0.0, "v_prediction": 0.0, "score": 0.0, "velocity": 0.0},
             "edm": {"sample": np.inf, "epsilon": 1.0, "v_prediction": 1 / a**2, "score": 0.0,
                     "velocity": a**2 / dd**2}}[weighting][pred]
    return (0.0, True) if w == np.inf else (w, False)


@pytest.mark.parametrize("wid,weighting,kw", WEIGHT_CASES, ids=_W_IDS)
@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_loss_weight_finite_and_limit_at_endpoints(name, wid, weighting, kw):
    """Finite, >= 0 at every endpoint; at alpha = 0 / sigma = 0 equal to the hand-worked limit, and
    (continuous processes) to the old formula just inside the endpoint -- which is large where the
    limit is +inf and loss_weight gives 0; elsewhere equal to the old formula."""
    proc, times = ENDPOINTS[name]
    t = jnp.asarray(times, jnp.float32)
    a, s, dd = _geometry(proc, t)
    degenerate = (a == 0) | (s == 0)
    assert degenerate.any() or name == "ve"
    for pred in PZ.PREDICTIONS:
        w = np.asarray(L.loss_weight(weighting, pred, t, proc, **kw), np.float64)
        assert w.shape == t.shape
        assert np.all(np.isfinite(w)) and np.all(w >= 0), (pred, w)
        with np.errstate(all="ignore"):
            old = np.asarray(old_loss_weight(weighting, pred, t, proc, **kw), np.float64)
        np.testing.assert_allclose(w[~degenerate], old[~degenerate], rtol=2e-5, err_msg=pred)
        for i in np.flatnonzero(degenerate):
            expect, infinite = endpoint_weight(weighting, pred, a[i], s[i], dd[i], **kw)
            np.testing.assert_allclose(w[i], expect, rtol=1e-5, atol=1e-12, err_msg=f"{pred} t={times[i]}")
            if proc.discrete:  # alpha jumps to 0 on (998, 999]: no limit from inside to compare with
                continue
            # the old formula at 1e-3 and 1e-4 inside the endpoint converges to it (or blows up)
            inward = 1.0 if times[i] == 0.0 else -1.0
            near = [float(old_loss_weight(weighting, pred, jnp.float32(times[i] + inward * d), proc, **kw))
                    for d in (1e-3, 1e-4)]
            if infinite:
                assert near[1] > 10 and near[1] > 2 * near[0], (pred, times[i], near)
            else:
                err = [abs(v - expect) for v in near]
                assert err[1] <= 1e-4 * (1 + expect) + 0.3 * err[0], (pred, times[i], expect, near)


@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_loss_weight_matches_old_formula_inside(name):
    """Away from alpha = 0 and sigma = 0 the rewritten weights are the old w0 / r to float rounding."""
    proc, _ = ENDPOINTS[name]
    lo, hi = proc.t_min, proc.t_max
    t = jnp.concatenate([jnp.linspace(lo, hi, 41), jnp.asarray([lo + 1e-4 * (hi - lo), hi - 1e-4 * (hi - lo)])])
    a, s, _ = _geometry(proc, t)
    keep = (a > 0) & (s > 0)
    assert keep.sum() >= 40
    for _, weighting, kw in WEIGHT_CASES:
        for pred in PZ.PREDICTIONS:
            w = np.asarray(L.loss_weight(weighting, pred, t, proc, **kw), np.float64)
            with np.errstate(all="ignore"):
                old = np.asarray(old_loss_weight(weighting, pred, t, proc, **kw), np.float64)
            np.testing.assert_allclose(w[keep], old[keep], rtol=2e-5, err_msg=f"{weighting} {kw} {pred}")


def _unweighted_target_is_infinite(pred, proc, t):
    """Points where the unweighted loss is already non-finite whatever the weighting -- the target or
    the network input is infinite there (parameterization, not weighting): score = -eps / sigma at
    sigma = 0; velocity where sigma'(t) = inf (VP at t = 0: sigma ~ sqrt(t)). (EDM's preconditioning
    is finite at alpha = 0 and sigma = 0: parameterization.edm_vp_coefficients.)"""
    a, s, _ = _geometry(proc, t)
    ds = np.asarray(proc.derivatives(jnp.asarray(t, jnp.float32))[1], np.float64)
    return {"score": s == 0, "velocity": np.isinf(ds)}.get(pred, np.zeros(a.shape, bool))


@pytest.mark.parametrize("name", list(ENDPOINTS))
def test_diffusion_loss_finite_when_times_include_endpoints(name, monkeypatch):
    """A full diffusion_loss whose time draw is the endpoints: finite for every weighting and
    prediction, except where the unweighted loss itself is (see _unweighted_target_is_infinite)."""
    proc, times = ENDPOINTS[name]
    t = jnp.asarray(times, jnp.float32)
    monkeypatch.setattr(L, "sample_times", lambda key, batch, process, density, **kw: t)
    x0 = jax.random.normal(jax.random.key(2), (len(times), 2, 3, 3))
    net = lambda x, ti: 0.5 * x + 0.1  # noqa: E731  (finite, ignores t: EDM's c_noise is -inf at sigma = 0)
    for pred in PZ.PREDICTIONS:
        bad = _unweighted_target_is_infinite(pred, proc, t)
        unweighted = np.asarray(L.diffusion_loss(net, x0, KEY, process=proc, prediction=pred))
        assert np.array_equal(~np.isfinite(unweighted), bad), (pred, unweighted)
        for _, weighting, kw in WEIGHT_CASES:
            loss = np.asarray(L.diffusion_loss(net, x0, KEY, process=proc, prediction=pred, weighting=weighting,
                                               **kw))
            assert np.all(np.isfinite(loss[~bad])) and np.all(loss[~bad] >= 0), (pred, weighting, kw, loss)
    if name in ("discrete_zero_snr", "rectified_flow"):  # the cases: nothing excluded
        for pred in ("epsilon", "sample", "v_prediction", "velocity", "edm"):
            assert not _unweighted_target_is_infinite(pred, proc, t).any()


def test_zero_terminal_snr_min_snr_eps_batch_is_finite():
    """The reported case: zero-terminal-SNR DDPM, min-SNR on eps, the default (integer) time draw at
    batch 128 -- key 1 draws t = 999 once, which made the whole batch's loss NaN."""
    key = jax.random.key(1)
    t = L.sample_times(jax.random.split(key)[0], 128, ZERO_SNR_DDPM)
    assert int(jnp.sum(t == ZERO_SNR_DDPM.t_max)) == 1
    x0 = jax.random.normal(jax.random.key(3), (128, 2, 4, 4))
    net = lambda x, ti: 0.9 * x  # noqa: E731
    for weighting in ("min_snr", "p2"):
        loss = L.diffusion_loss(net, x0, key, process=ZERO_SNR_DDPM, prediction="epsilon", weighting=weighting)
        assert bool(jnp.all(jnp.isfinite(loss))), weighting
        w = L.loss_weight(weighting, "epsilon", t, ZERO_SNR_DDPM)
        np.testing.assert_allclose(w[t == ZERO_SNR_DDPM.t_max], 1.0)  # min(SNR, gamma) / SNR -> 1, 1 / (k + SNR) -> 1
    g = jax.grad(lambda c: jnp.mean(L.diffusion_loss(lambda x, ti: c * x, x0, key, process=ZERO_SNR_DDPM,
                                                      prediction="epsilon", weighting="min_snr")))(0.9)
    assert np.isfinite(float(g))
