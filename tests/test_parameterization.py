"""Prediction types: exact conversions, EDM preconditioning, and make_denoiser with an oracle net."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import parameterization as PZ
from jaxdiff import processes as P

PROCESSES = {
    "discrete": P.discrete_vp("scaled_linear", beta_start=0.00085, beta_end=0.012),
    "vp_linear": P.VPLinear(),
    "vp_cosine": P.VPCosine(),
    "ve": P.VE(),
    "edm": P.EDM(),
    "rectified_flow": P.RectifiedFlow(),
}
TYPES = [p for p in PZ.PREDICTIONS if p != "edm"]
SHAPE = (3, 2, 4, 4)


def times(proc):
    """Three times (one per example) away from the ends of the domain."""
    lo, hi = proc.t_min, proc.t_max
    return jnp.asarray([lo + 0.1 * (hi - lo), lo + 0.5 * (hi - lo), lo + 0.9 * (hi - lo)], jnp.float32)


def data(proc, t):
    k0, k1 = jax.random.split(jax.random.key(42))
    x0 = jax.random.normal(k0, SHAPE)
    eps = jax.random.normal(k1, SHAPE)
    return x0, eps, proc.marginal(x0, t, eps)


def bc(c):
    return jnp.reshape(c, (-1, 1, 1, 1))


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def expected_target(pred, proc, x0, eps, t):
    """The targets written out from their definitions (independent of from_x0)."""
    a, s = bc(proc.alpha(t)), bc(proc.sigma(t))
    if pred == "epsilon":
        return eps
    if pred == "sample":
        return x0
    if pred == "v_prediction":  # Salimans & Ho 2022
        return a * eps - s * x0
    if pred == "score":  # grad log N(x; a x0, s^2) = -(x - a x0) / s^2
        return -eps / s
    if pred == "velocity":  # d/dt (alpha(t) x0 + sigma(t) eps), by autodiff of the closed forms
        da = jax.vmap(jax.grad(lambda u: proc.alpha(u)))(t)
        ds = jax.vmap(jax.grad(lambda u: proc.sigma(u)))(t)
        return bc(da) * x0 + bc(ds) * eps
    raise AssertionError(pred)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_from_x0_is_the_definition_and_round_trips(name):
    proc = PROCESSES[name]
    t = times(proc)
    x0, eps, x = data(proc, t)
    for pred in TYPES:
        target = PZ.from_x0(pred, x0, x, t, proc)
        assert target.shape == SHAPE
        assert rel_err(target, expected_target(pred, proc, x0, eps, t)) < 2e-4, pred
        assert rel_err(PZ.to_x0(pred, target, x, t, proc), x0) < 2e-4, pred
    if name == "rectified_flow":  # u = eps - x0 for the linear interpolant
        assert rel_err(PZ.from_x0("velocity", x0, x, t, proc), eps - x0) < 1e-5


@pytest.mark.parametrize("name", list(PROCESSES))
def test_convert_round_trips_between_all_types(name):
    proc = PROCESSES[name]
    t = times(proc)
    x0, eps, x = data(proc, t)
    for src, dst in itertools.product(TYPES, TYPES):
        out = PZ.from_x0(src, x0, x, t, proc)
        there = PZ.convert(out, x, t, proc, src, dst)
        assert rel_err(there, expected_target(dst, proc, x0, eps, t)) < 5e-4, (src, dst)
        back = PZ.convert(there, x, t, proc, dst, src)
        assert rel_err(back, out) < 5e-4, (src, dst)
    assert PZ.convert(x0, x, t, proc, "sample", "sample") is x0


@pytest.mark.parametrize("name", ["discrete", "edm", "rectified_flow"])
def test_scalar_time_broadcasts(name):
    """Samplers pass a scalar t; conversions must broadcast it over the batch."""
    proc = PROCESSES[name]
    t = times(proc)[1]
    x0, eps, x = data(proc, jnp.full((SHAPE[0],), t))
    for pred in TYPES:
        out = PZ.from_x0(pred, x0, x, t, proc)
        assert rel_err(PZ.to_x0(pred, out, x, t, proc), x0) < 2e-4, pred


def test_edm_precond_is_karras_table_1():
    sd = 0.5
    sig = np.array([0.002, 0.1, 0.5, 1.0, 7.0, 80.0])
    c_skip, c_out, c_in, c_noise = (np.asarray(c, np.float64) for c in PZ.edm_precond(jnp.asarray(sig), sd))
    np.testing.assert_allclose(c_skip, sd**2 / (sig**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_out, sig * sd / np.sqrt(sd**2 + sig**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sig**2 + sd**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(sig) / 4, rtol=1e-6)
    # Unit training-target variance (Karras et al. Eq. 8 / App. B.6): for x0 ~ N(0, sd^2),
    # Var(c_in x) = 1 and Var((x0 - c_skip x) / c_out) = 1.
    np.testing.assert_allclose(c_in**2 * (sd**2 + sig**2), 1.0, rtol=1e-5)
    np.testing.assert_allclose(((1 - c_skip) ** 2 * sd**2 + c_skip**2 * sig**2) / c_out**2, 1.0, rtol=1e-4)
    # other sigma_data
    c_skip1, *_ = PZ.edm_precond(1.0, sigma_data=1.0)
    assert float(c_skip1) == pytest.approx(0.5)


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("pred", list(PZ.PREDICTIONS))
def test_make_denoiser_with_oracle_net_returns_x0(name, pred):
    proc = PROCESSES[name]
    t = times(proc)
    x0, eps, x = data(proc, t)
    a, s = proc.alpha(t), proc.sigma(t)
    seen = {}

    def net(x_in, t_in):
        seen["x_in"], seen["t_in"] = x_in, t_in
        if pred != "edm":
            return expected_target(pred, proc, x0, eps, t)
        # EDM: the network sees c_in x~ with x~ = x / alpha and returns F with D = c_skip x~ + c_out F.
        c_skip, c_out, _, _ = PZ.edm_precond(s / a)
        x_tilde = x / bc(a)
        return (x0 - bc(c_skip) * x_tilde) / bc(c_out)

    den = PZ.make_denoiser(net, proc, pred)
    out = den(x, t)
    assert out.shape == SHAPE and out.dtype == jnp.float32
    assert rel_err(out, x0) < 2e-4
    # What the network was fed.
    assert seen["t_in"].shape == (SHAPE[0],)
    if pred == "edm":
        c_skip, c_out, c_in, c_noise = PZ.edm_precond(s / a)
        np.testing.assert_allclose(seen["x_in"], bc(c_in) * x / bc(a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(seen["t_in"], np.log(np.asarray(s / a)) / 4, rtol=1e-5, atol=1e-6)
        # and the network input has unit scale for unit-variance-ish data
        assert 0.3 < float(jnp.std(seen["x_in"])) < 3.0
    else:
        np.testing.assert_array_equal(seen["x_in"], x)
        np.testing.assert_allclose(seen["t_in"], proc.net_time(t), rtol=1e-6)
    # Scalar t, as samplers call it.
    tt = t[1]
    xs = proc.marginal(x0, jnp.full((SHAPE[0],), tt), eps)

    def net_scalar(x_in, t_in):
        assert t_in.shape == (SHAPE[0],)
        ts = jnp.full((SHAPE[0],), tt)
        if pred != "edm":
            return expected_target(pred, proc, x0, eps, ts)
        c_skip, c_out, _, _ = PZ.edm_precond(proc.sigma(ts) / proc.alpha(ts))
        return (x0 - bc(c_skip) * xs / bc(proc.alpha(ts))) / bc(c_out)

    assert rel_err(PZ.make_denoiser(net_scalar, proc, pred)(xs, tt), x0) < 2e-4


def test_net_time_per_process():
    t = jnp.asarray([0.5, 0.25])
    np.testing.assert_allclose(PZ.net_inputs("epsilon", jnp.ones((2, 3)), t, P.VPLinear())[1], [500.0, 250.0])
    np.testing.assert_allclose(PZ.net_inputs("epsilon", jnp.ones((2, 3)), 17.0, PROCESSES["discrete"])[1], [17, 17])
    np.testing.assert_allclose(PZ.net_inputs("sample", jnp.ones((2, 3)), t, P.EDM())[1], np.log([0.5, 0.25]) / 4,
                               rtol=1e-6)


def test_unknown_prediction_raises():
    with pytest.raises(ValueError, match="epsilon, sample, v_prediction, score, velocity, edm"):
        PZ.to_x0("eps", jnp.ones((1, 2)), jnp.ones((1, 2)), 0.5, P.VPLinear())
    with pytest.raises(ValueError, match="valid"):
        PZ.from_x0("x0", jnp.ones((1, 2)), jnp.ones((1, 2)), 0.5, P.VPLinear())
    with pytest.raises(ValueError, match="valid"):
        PZ.make_denoiser(lambda x, t: x, P.VPLinear(), "noise")


def test_make_denoiser_is_jittable_and_differentiable():
    proc = P.EDM()
    w = jnp.asarray(0.3)

    def loss(w):
        den = PZ.make_denoiser(lambda x, t: w * x, proc, "edm")
        return jnp.sum(den(jnp.ones((2, 4)), jnp.asarray([0.5, 2.0])) ** 2)

    g = jax.jit(jax.grad(loss))(w)
    assert np.isfinite(float(g)) and float(g) != 0.0


def _old_edm_denoiser(net, proc, x, t, sigma_data=0.5):
    """make_denoiser's EDM branch as first written (NaN at sigma = 0 and alpha = 0)."""
    a = proc.alpha(jnp.full((x.shape[0],), t))
    s = proc.sigma(jnp.full((x.shape[0],), t)) / a
    c_skip, c_out, c_in, c_noise = PZ.edm_precond(s, sigma_data)
    out = net((c_in / a)[:, None] * x, c_noise)
    return (c_skip / a)[:, None] * x + c_out[:, None] * out


@pytest.mark.parametrize("proc", [P.EDM(), P.VPCosine(), P.VPLinear(), P.RectifiedFlow()],
                         ids=lambda p: type(p).__name__)
def test_edm_preconditioning_is_finite_at_both_ends(proc):
    """Karras et al.'s preconditioning in the VP frame, rewritten so that sigma = 0 (D = x / alpha:
    c_out = 0) and alpha = 0 (rectified flow at t = 1) give finite values; equal inside."""
    net = lambda x_in, c_noise: jnp.tanh(x_in) + 0.1 * jnp.sin(c_noise)[:, None]  # noqa: E731
    x = jax.random.normal(jax.random.key(0), (4, 3))
    d = PZ.make_denoiser(net, proc, "edm")
    for t in (float(proc.t_min), float(proc.t_max), 0.0):
        out = np.asarray(d(x, t))
        assert np.all(np.isfinite(out)), (t, out)
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        if s == 0.0:
            np.testing.assert_allclose(out, np.asarray(x) / a, rtol=1e-6)
        if a == 0.0:  # D = sigma_data F(x / sigma, .)
            np.testing.assert_allclose(out, 0.5 * np.asarray(net(x / s, jnp.full((4,), 0.25 * np.log(1e30)))),
                                       rtol=1e-5)
    lo, hi = float(proc.t_min), float(proc.t_max)
    for t in np.linspace(lo, hi, 9)[1:-1]:
        np.testing.assert_allclose(np.asarray(d(x, float(t))), np.asarray(_old_edm_denoiser(net, proc, x, float(t))),
                                   rtol=2e-5, atol=1e-6)
    x_in, t_in = PZ.net_inputs("edm", x, 0.5 * (lo + hi), proc)
    assert np.all(np.isfinite(np.asarray(x_in))) and np.all(np.isfinite(np.asarray(t_in)))


def test_times_without_an_x0_are_refused():
    # alpha = 0: the zero-terminal-SNR chain at t_max, the linear flow at t = 1 (sampling from
    # there returned all-NaN images for these predictions)
    zsnr = P.discrete_vp(rescale_betas_zero_snr=True)
    flow = P.RectifiedFlow()
    for pred in ("epsilon", "score", "velocity"):
        with pytest.raises(ValueError, match=f"prediction '{pred}' gives no x0 at t = 999"):
            PZ.check_x0_recoverable(pred, zsnr, 999.0)
    with pytest.raises(ValueError, match="velocity carries no information"):
        PZ.check_x0_recoverable("velocity", zsnr, 998.5)  # alpha = 0 on the whole last interval
    for pred in ("epsilon", "score"):
        with pytest.raises(ValueError, match="alpha = 0 there"):
            PZ.check_x0_recoverable(pred, flow, 1.0)
    # finite: v / sample / edm everywhere, velocity on the flow at t = 1, every type below t_max
    for pred in ("v_prediction", "sample", "edm"):
        PZ.check_x0_recoverable(pred, zsnr, 999.0)
    PZ.check_x0_recoverable("velocity", flow, 1.0)
    for pred in PZ.PREDICTIONS:
        PZ.check_x0_recoverable(pred, zsnr, 998.0)
        x0 = PZ.to_x0(pred, jnp.ones((1, 2)), jnp.ones((1, 2)), jnp.array([998.0]), zsnr)
        assert bool(jnp.all(jnp.isfinite(x0))), pred


def test_sampling_config_starting_at_alpha_zero_is_refused():
    from jaxdiff.config_base import base_config
    from jaxdiff.generate import sample_nfe

    c = base_config()
    c.diffusion.process = {"name": "discrete_vp", "rescale_betas_zero_snr": True}
    c.diffusion.prediction = "epsilon"
    with pytest.raises(ValueError, match="first time of the sampling grid"):
        sample_nfe(c, "ddim", 10, grid_kind="trailing")
    assert sample_nfe(c, "ddim", 10, grid_kind="leading") == 10
    c.diffusion.prediction = "v_prediction"
    assert sample_nfe(c, "ddim", 10, grid_kind="trailing") == 10


def test_learned_variance_refuses_velocity_on_a_zero_snr_chain():
    from jaxdiff.variance import check_learned_variance

    with pytest.raises(ValueError, match="'velocity' on a zero-terminal-SNR"):
        check_learned_variance(P.discrete_vp(rescale_betas_zero_snr=True), prediction="velocity")
    check_learned_variance(P.discrete_vp(rescale_betas_zero_snr=True), prediction="v_prediction")
