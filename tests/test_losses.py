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
