"""jaxdiff.variance (iDDPM's learned variances and the bound's terms) against independent forms:
Gaussian conditioning for the posterior, torch.distributions for the KL, scipy's normal CDF for
the discretised decoder, and the closed-form optimal variance of Gaussian data for the gradient
of the bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff import losses as L
from jaxdiff import parameterization as PZ
from jaxdiff import processes as P
from jaxdiff import variance as V

PROC = P.discrete_vp("linear")


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_posterior_tables_equal_gaussian_conditioning(schedule):
    """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0:
    x_{t-1} ~ N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z."""
    proc = P.discrete_vp(schedule)
    ac = np.asarray(proc.alphas_cumprod, np.float64)
    tab = V.posterior_tables(proc.alphas_cumprod)
    for t in [1, 2, 17, 500, len(ac) - 1]:
        ap = ac[t - 1]
        a_step = ac[t] / ap
        var_prev, var_t = 1.0 - ap, 1.0 - ac[t]
        cov = math.sqrt(a_step) * var_prev
        # mean = sqrt(ap) x0 + cov / var_t (x_t - sqrt(ac_t) x0)
        coef_xt = cov / var_t
        coef_x0 = math.sqrt(ap) - coef_xt * math.sqrt(ac[t])
        var = var_prev - cov**2 / var_t
        np.testing.assert_allclose(tab["coef_xt"][t], coef_xt, rtol=1e-10)
        np.testing.assert_allclose(tab["coef_x0"][t], coef_x0, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.exp(tab["log_beta_tilde"][t]), var, rtol=1e-8)
        np.testing.assert_allclose(np.exp(tab["log_beta"][t]), 1.0 - a_step, rtol=1e-10)
    # t = 0 steps into the data (abar_{-1} = 1): the mean is x0_hat; beta~_0 is clipped to beta~_1
    assert tab["coef_x0"][0] == pytest.approx(1.0) and tab["coef_xt"][0] == 0.0
    assert tab["log_beta_tilde"][0] == tab["log_beta_tilde"][1]


def test_normal_kl_equals_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    lv1, lv2 = rng.normal(size=50) * 2, rng.normal(size=50) * 2
    ours = np.asarray(V.normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2))))
    N = torch.distributions.Normal
    theirs = torch.distributions.kl_divergence(
        N(torch.tensor(m1), torch.tensor(np.exp(0.5 * lv1))), N(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2))))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=2e-5, atol=1e-6)


def test_discretized_likelihood_equals_scipy_and_sums_to_one():
    levels = np.linspace(-1.0, 1.0, 256)
    for mean, log_scale in [(0.3, np.log(0.05)), (-0.97, np.log(0.01)), (0.0, np.log(2.0)), (0.9, np.log(1e-3))]:
        ll = np.asarray(V.discretized_gaussian_log_likelihood(
            jnp.asarray(levels, jnp.float32), jnp.float32(mean), jnp.float32(log_scale)), np.float64)
        scale, half = math.exp(log_scale), 1.0 / 255
        zu, zl = (levels + half - mean) / scale, (levels - half - mean) / scale
        right = levels > mean  # difference of survival functions there: no cancellation near 1
        inner = np.where(right, stats.norm.sf(zl) - stats.norm.sf(zu), stats.norm.cdf(zu) - stats.norm.cdf(zl))
        ref = np.where(levels < -0.999, stats.norm.cdf(zu), np.where(levels > 0.999, stats.norm.sf(zl), inner))
        big = ref > 1e-30
        np.testing.assert_allclose(ll[big], np.log(ref[big]), rtol=2e-4, atol=2e-4)
        assert np.exp(ll).sum() == pytest.approx(1.0, abs=1e-4)  # the bins partition the real line
    # far in a tail (the bin's probability ~ e^-1235, zero in float64): finite, = log sf(lower edge)
    # + log(1 - sf(upper) / sf(lower)), the second term ~ -e^-19.7 here
    far = float(V.discretized_gaussian_log_likelihood(jnp.float32(0.5), jnp.float32(0.0), jnp.float32(np.log(0.01))))
    assert far == pytest.approx(stats.norm.logsf((0.5 - 1 / 255) / 0.01), rel=1e-5)


def test_vlb_term_closed_forms():
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.uniform(-1, 1, (3, 4, 4, 2)), jnp.float32)
    xt = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    t = jnp.array([10.0, 400.0, 999.0])
    tab = V.posterior_tables(PROC.alphas_cumprod)
    # exact mean and v = -1 (Sigma = beta~): zero KL
    kl0 = V.vlb_term(PROC, x0, xt, t, x0, -jnp.ones_like(x0))
    np.testing.assert_allclose(np.asarray(kl0), 0.0, atol=1e-6)
    # v = +1 (Sigma = beta): 0.5 (-1 + log beta - log beta~ + beta~ / beta) nats per dimension
    kl1 = np.asarray(V.vlb_term(PROC, x0, xt, t, x0, jnp.ones_like(x0)))
    ti = np.asarray(t, int)
    ac = np.asarray(PROC.alphas_cumprod, np.float64)
    d = np.log((1 - ac[ti]) / (1 - ac[ti - 1]))  # log beta - log beta~ in float64: 8.2e-7 at t = 999
    np.testing.assert_allclose(kl1, 0.5 * (d + np.expm1(-d)) / math.log(2), rtol=1e-5)
    # its gradient in v at v = 0.3: d/dv (e + e^-e - 1) / 2 with e = (v + 1) / 2 * d, per dimension
    for i in range(3):
        g = jax.grad(lambda v, i=i: V.vlb_term(PROC, x0[i:i + 1], xt[i:i + 1], t[i:i + 1], x0[i:i + 1],
                                               jnp.full_like(x0[i:i + 1], v))[0])(jnp.float32(0.3))
        e = 0.65 * d[i]
        assert float(g) == pytest.approx(0.5 * -np.expm1(-e) * d[i] / 2 / math.log(2), rel=1e-4)
    # a mean error e adds e^2 / (2 Sigma) nats: here with Sigma = beta~ (v = -1)
    x0_hat = x0 + 0.1
    kl_e = np.asarray(V.vlb_term(PROC, x0, xt, t, x0_hat, -jnp.ones_like(x0)))
    want = (tab["coef_x0"][ti] * 0.1) ** 2 / (2 * np.exp(tab["log_beta_tilde"][ti])) / math.log(2)
    np.testing.assert_allclose(kl_e, want, rtol=1e-3)
    # t = 0: the decoder's NLL in bits of x0 on the 256 levels
    lv = np.linspace(-1, 1, 256)[rng.integers(0, 256, (1, 4, 4, 2))]
    nll = float(V.vlb_term(PROC, jnp.asarray(lv, jnp.float32), xt[:1], jnp.zeros(1), jnp.asarray(lv, jnp.float32),
                           jnp.zeros((1, 4, 4, 2)))[0])
    sd = math.exp(0.5 * (0.5 * tab["log_beta"][0] + 0.5 * tab["log_beta_tilde"][0]))
    p = stats.norm.cdf(1 / 255 / sd) - stats.norm.cdf(-1 / 255 / sd)
    interior = np.abs(lv) < 0.999
    want = -(np.log(p) * interior.mean() + np.log(stats.norm.cdf(1 / 255 / sd)) * (1 - interior.mean())) / math.log(2)
    assert nll == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("t", [3, 50, 300])
def test_bound_gradient_finds_the_optimal_variance_of_gaussian_data(t):
    """For x0 ~ N(0, s^2) and the exact posterior mean x0_hat = E[x0 | x_t], the expected KL is
    smallest at Sigma* = beta~_t + coef_x0^2 Var[x0 | x_t] = Var[x_{t-1} | x_t] (which lies in
    [beta~, beta]). Gradient descent on v through vlb_term must find it."""
    s = 0.5
    ac = np.asarray(PROC.alphas_cumprod, np.float64)
    tab = V.posterior_tables(PROC.alphas_cumprod)
    a2, var_noise = ac[t], 1 - ac[t]
    post_var_x0 = s**2 * var_noise / (a2 * s**2 + var_noise)
    target = np.exp(tab["log_beta_tilde"][t]) + tab["coef_x0"][t] ** 2 * post_var_x0
    assert np.exp(tab["log_beta_tilde"][t]) <= target <= np.exp(tab["log_beta"][t])
    k0, k1 = jax.random.split(jax.random.key(t))
    n = 200_000
    x0 = s * jax.random.normal(k0, (n, 1))
    xt = math.sqrt(a2) * x0 + math.sqrt(var_noise) * jax.random.normal(k1, (n, 1))
    x0_hat = xt * (math.sqrt(a2) * s**2 / (a2 * s**2 + var_noise))
    tt = jnp.full((n,), float(t))

    def loss(v):
        return jnp.mean(V.vlb_term(PROC, x0, xt, tt, x0_hat, jnp.broadcast_to(v, x0.shape)))

    lr = 2.0 / (tab["log_beta"][t] - tab["log_beta_tilde"][t]) ** 2
    descend = jax.jit(lambda v: jax.lax.fori_loop(0, 300, lambda _, v: v - lr * jax.grad(loss)(v), v))
    v = descend(jnp.float32(0.0))  # the loss is convex in log Sigma, hence in v
    found = float(np.exp(V.learned_range_log_variance(v, tab["log_beta"][t], tab["log_beta_tilde"][t])))
    assert found == pytest.approx(target, rel=2e-2)


def _two_headed_net(w_mean, w_var):
    def net(x, t):
        return jnp.concatenate([jnp.tanh(x * w_mean), jnp.tanh(x * w_var + 1e-3 * t[:, None, None, None])], -1)
    return net


def test_hybrid_loss_is_mse_plus_weighted_bound_and_bound_trains_only_the_variance():
    x0 = jax.random.uniform(jax.random.key(0), (8, 4, 4, 3), minval=-1, maxval=1)
    key = jax.random.key(5)

    def loss(wm, wv, variance="learned_range", weight=0.001):
        return jnp.mean(L.diffusion_loss(_two_headed_net(wm, wv), x0, key, process=PROC, prediction="epsilon",
                                         variance=variance, vlb_weight=weight))

    wm, wv = jnp.float32(0.7), jnp.float32(0.3)
    mse_only = loss(wm, wv, weight=0.0)
    # the mse part equals the fixed-variance loss of the prediction channels alone
    fixed = jnp.mean(L.diffusion_loss(lambda x, t: jnp.tanh(x * wm), x0, key, process=PROC, prediction="epsilon"))
    assert float(mse_only) == pytest.approx(float(fixed), rel=1e-6)
    # the bound's part: T * weight * vlb_term at the drawn t with x0_hat from the (frozen) mean
    k_t, k_eps = jax.random.split(key)
    t = L.sample_times(k_t, 8, PROC)
    eps = jax.random.normal(k_eps, x0.shape)
    xt = PROC.marginal(x0, t, eps)
    out = _two_headed_net(wm, wv)(xt, t)
    a, s = PROC.alpha(t)[:, None, None, None], PROC.sigma(t)[:, None, None, None]
    x0_hat = (xt - s * out[..., :3]) / a
    vb = V.vlb_term(PROC, x0, xt, t, x0_hat, out[..., 3:])
    assert float(loss(wm, wv)) == pytest.approx(float(mse_only + 0.001 * 1000 * jnp.mean(vb)), rel=1e-5)
    # stop-gradient: the bound moves the variance head only; the mean head's gradient is the mse's
    g_mean = jax.grad(loss, argnums=0)(wm, wv)
    assert float(g_mean) == pytest.approx(float(jax.grad(loss, argnums=0)(wm, wv, weight=0.0)), rel=1e-6)
    def bound_of(wv_):  # the same term written out, x0_hat held at its value
        out_ = _two_headed_net(wm, wv_)(xt, t)
        return 0.001 * 1000 * jnp.mean(V.vlb_term(PROC, x0, xt, t, x0_hat, out_[..., 3:]))

    g_var = float(jax.grad(loss, argnums=1)(wm, wv))
    assert g_var != 0.0 and g_var == pytest.approx(float(jax.grad(bound_of)(wv)), rel=1e-4)
    assert float(jax.grad(loss, argnums=1)(wm, wv, weight=0.0)) == 0.0


def test_learned_variance_errors():
    x0 = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        L.diffusion_loss(lambda x, t: x, x0, jax.random.key(0), process=PROC, prediction="epsilon",
                         variance="learned_range")
    with pytest.raises(ValueError, match="discrete_vp"):
        L.diffusion_loss(_two_headed_net(1.0, 1.0), x0, jax.random.key(0), process=P.VPCosine(),
                         prediction="epsilon", variance="learned_range")
    with pytest.raises(ValueError, match="t_density='default'"):
        L.diffusion_loss(_two_headed_net(1.0, 1.0), x0, jax.random.key(0), process=PROC, prediction="epsilon",
                         variance="learned_range", t_density="uniform")
    zero_snr = P.discrete_vp("linear", rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        L.diffusion_loss(_two_headed_net(1.0, 1.0), x0, jax.random.key(0), process=zero_snr, prediction="epsilon",
                         variance="learned_range")
    # v-prediction is finite there, values and gradients, also at the last step (alpha = 0)
    t_last = jnp.full((2,), 999.0)
    xt = zero_snr.marginal(x0 + 0.3, t_last, jnp.ones_like(x0))
    out = _two_headed_net(0.5, 0.5)(xt, t_last)
    x0_hat = PZ.to_x0("v_prediction", out[..., :3], xt, t_last, zero_snr)
    grad = jax.grad(lambda v: jnp.sum(V.vlb_term(zero_snr, x0 + 0.3, xt, t_last, x0_hat, v)))(out[..., 3:])
    assert np.all(np.isfinite(np.asarray(grad))) and np.any(np.asarray(grad) != 0)
    # and diffusion_loss accepts it: finite loss and gradients over a batch whose times reach the end (>= 990)
    xb = jax.random.uniform(jax.random.key(2), (64, 4, 4, 3), minval=-1, maxval=1)

    def hybrid(w):
        return jnp.mean(L.diffusion_loss(_two_headed_net(w, w), xb, jax.random.key(3), process=zero_snr,
                                         prediction="v_prediction", variance="learned_range"))

    ts = L.sample_times(jax.random.split(jax.random.key(3))[0], 64, zero_snr)
    loss, g = jax.value_and_grad(hybrid)(jnp.float32(0.5))
    assert np.isfinite(float(loss)) and np.isfinite(float(g)) and float(jnp.max(ts)) >= 990
    with pytest.raises(ValueError, match="unknown variance"):
        L.diffusion_loss(_two_headed_net(1.0, 1.0), x0, jax.random.key(0), process=PROC, prediction="epsilon",
                         variance="learned")


def test_vlb_bits_per_dim_closed_form_on_a_point_mass():
    """Data that is one 8-bit level c everywhere and the oracle denoiser x0_hat = c: every KL term
    is then the variances' mismatch alone (0 for beta~, closed form for beta), the decoder is the
    mass of c's bin under N(c, beta~_1) and the prior KL(N(sqrt(abar) c, 1 - abar) || N(0, 1));
    all written here from alphas_cumprod in float64."""
    c = np.linspace(-1, 1, 256)[170]
    x0 = jnp.full((2, 4, 4, 1), c, jnp.float32)
    oracle = lambda x, t: jnp.full_like(x, c)  # noqa: E731
    ac = np.asarray(PROC.alphas_cumprod, np.float64)
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1 - ac / prev
    beta_tilde = beta * (1 - prev) / (1 - ac)
    prior = 0.5 * (-1 - np.log1p(-ac[-1]) + (1 - ac[-1]) + ac[-1] * c**2) / math.log(2)
    sd = math.sqrt(beta_tilde[1])
    decoder = -math.log(stats.norm.cdf(1 / 255 / sd) - stats.norm.cdf(-1 / 255 / sd)) / math.log(2)
    d = np.log(beta[1:]) - np.log(beta_tilde[1:])
    large_terms = 0.5 * (d - 1 + np.exp(-d)) / math.log(2)

    small = V.vlb_bits_per_dim(oracle, PROC, x0, jax.random.key(0), variance="fixed_small")
    assert small["terms"].shape == (1000, 2)
    np.testing.assert_allclose(np.asarray(small["prior"]), prior, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(small["decoder"]), decoder, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(small["terms"][1:]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(small["total"]), prior + decoder, rtol=1e-5)
    large = V.vlb_bits_per_dim(oracle, PROC, x0, jax.random.key(0), variance="fixed_large")
    np.testing.assert_allclose(np.asarray(large["terms"][1:, 0]), large_terms, rtol=2e-3, atol=1e-9)
    np.testing.assert_allclose(np.asarray(large["total"]), prior + decoder + large_terms.sum(), rtol=1e-4)
    # learned_range at its ends: v = -1 is fixed_small; v = +1 is fixed_large for t >= 1
    for v, ref in ((-1.0, small), (1.0, large)):
        out = V.vlb_bits_per_dim(lambda x, t, v=v: (oracle(x, t), jnp.full_like(x, v)), PROC, x0,
                                 jax.random.key(0), variance="learned_range")
        np.testing.assert_allclose(np.asarray(out["terms"][1:]), np.asarray(ref["terms"][1:]), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="discrete chain"):
        V.vlb_bits_per_dim(oracle, P.VPCosine(), x0, jax.random.key(0))


def test_vlb_bits_per_dim_of_a_wrong_denoiser_is_larger():
    """The bound of a denoiser that is off by 0.05 exceeds the oracle's by the mean-gap terms
    sum_t coef_x0^2 0.05^2 / (2 beta~_t) / log 2 (exactly, up to float32), on the same point mass."""
    c = np.linspace(-1, 1, 256)[40]
    x0 = jnp.full((1, 2, 2, 1), c, jnp.float32)
    ac = np.asarray(PROC.alphas_cumprod, np.float64)
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1 - ac / prev
    beta_tilde = beta * (1 - prev) / (1 - ac)
    coef = np.sqrt(prev) * beta / (1 - ac)
    exact = V.vlb_bits_per_dim(lambda x, t: jnp.full_like(x, c), PROC, x0, jax.random.key(1))
    off = V.vlb_bits_per_dim(lambda x, t: jnp.full_like(x, c + 0.05), PROC, x0, jax.random.key(1))
    gap = np.asarray(off["terms"][1:, 0] - exact["terms"][1:, 0], np.float64)
    np.testing.assert_allclose(gap, (coef[1:] * 0.05) ** 2 / (2 * beta_tilde[1:]) / math.log(2), rtol=1e-3)
    assert float(off["total"][0]) > float(exact["total"][0])


def _bpd_loop_float64(denoise64, ac, x0, noises, variance, v64=None, clip=None, bins=256):
    """guided-diffusion's calc_bpd_loop written out in float64 (exact normal CDF): prior KL plus,
    for every t, KL(q(x_{t-1} | x_t, x0) || p) or the decoder at t = 0, in bits per dimension."""
    ac = np.asarray(ac, np.float64)
    prev = np.concatenate([[1.0], ac[:-1]])
    beta = 1 - ac / prev
    post_var = beta * (1 - prev) / (1 - ac)
    log_post_clipped = np.log(np.concatenate([post_var[1:2], post_var[1:]]))
    log_large = np.log(np.concatenate([post_var[1:2], beta[1:]]))
    total = 0.5 * (-1 - np.log1p(-ac[-1]) + (1 - ac[-1]) + ac[-1] * x0**2).mean(axis=(1, 2, 3)) / math.log(2)
    half = 1 / (bins - 1)
    for t in range(len(ac)):
        xt = math.sqrt(ac[t]) * x0 + math.sqrt(1 - ac[t]) * noises[t]
        x0_hat = denoise64(xt, t)
        if clip is not None:
            x0_hat = np.clip(x0_hat, -clip, clip)
        mean = math.sqrt(prev[t]) * beta[t] / (1 - ac[t]) * x0_hat + math.sqrt(ac[t] / prev[t]) * (1 - prev[t]) / (1 - ac[t]) * xt
        if variance == "learned_range":
            f = (v64(xt, t) + 1) / 2
            lv = f * np.log(beta[t]) + (1 - f) * log_post_clipped[t]
        else:
            lv = np.full_like(x0, log_post_clipped[t] if variance == "fixed_small" else log_large[t])
        if t == 0:
            sd = np.exp(0.5 * lv)
            up, lo = stats.norm.cdf((x0 - mean + half) / sd), stats.norm.cdf((x0 - mean - half) / sd)
            p = np.where(x0 < -0.999, up, np.where(x0 > 0.999, 1 - lo, up - lo))
            term = -np.log(p)
        else:
            true_mean = (math.sqrt(prev[t]) * beta[t] / (1 - ac[t]) * x0
                         + math.sqrt(ac[t] / prev[t]) * (1 - prev[t]) / (1 - ac[t]) * xt)
            lv1 = log_post_clipped[t]
            term = 0.5 * (-1 + lv - lv1 + np.exp(lv1 - lv) + (true_mean - mean) ** 2 * np.exp(-lv))
        total = total + term.mean(axis=(1, 2, 3)) / math.log(2)
    return total


@pytest.mark.parametrize("variance", ["learned_range", "fixed_large"])
def test_vlb_bits_per_dim_equals_a_float64_bpd_loop(variance):
    """A denoiser that depends on x_t and t, clipping, learned v: the whole bound against the
    float64 loop above on a 50-step chain, with the same per-t noise."""
    proc = P.discrete_vp("linear", num_train_timesteps=50, beta_start=1e-3, beta_end=0.2)
    rng = np.random.default_rng(4)
    x0 = np.linspace(-1, 1, 256)[rng.integers(0, 256, (3, 4, 4, 2))]
    key = jax.random.key(8)
    noises = [np.asarray(jax.random.normal(k, x0.shape, jnp.float32), np.float64) for k in jax.random.split(key, 50)]
    d64 = lambda xt, t: 1.3 * np.tanh(0.8 * xt + 0.01 * t)  # noqa: E731
    v64 = lambda xt, t: np.tanh(0.5 * xt - 0.03 * t)  # noqa: E731

    def den(xt, t):
        tb = jnp.reshape(t, (-1, 1, 1, 1))
        x0_hat = 1.3 * jnp.tanh(0.8 * xt + 0.01 * tb)
        return (x0_hat, jnp.tanh(0.5 * xt - 0.03 * tb)) if variance == "learned_range" else x0_hat

    ours = V.vlb_bits_per_dim(den, proc, jnp.asarray(x0, jnp.float32), key, variance=variance, clip_denoised=1.0)
    want = _bpd_loop_float64(d64, proc.alphas_cumprod, x0, noises, variance, v64, clip=1.0)
    np.testing.assert_allclose(np.asarray(ours["total"]), want, rtol=2e-5)


def test_decoder_edges_at_adm_threshold():
    """Continuous data between the last two levels' midpoint and ADM's 0.999 is an interior bin."""
    for x in (0.9975, -0.9975):
        m = math.copysign(0.99, x)
        got = float(V.discretized_gaussian_log_likelihood(jnp.float32(x), jnp.float32(m), jnp.float32(np.log(0.01))))
        z_up, z_lo = (x + 1 / 255 - m) / 0.01, (x - 1 / 255 - m) / 0.01
        assert got == pytest.approx(math.log(stats.norm.cdf(z_up) - stats.norm.cdf(z_lo)), rel=1e-4)
    edge = float(V.discretized_gaussian_log_likelihood(jnp.float32(0.9995), jnp.float32(0.99), jnp.float32(np.log(0.01))))
    assert edge == pytest.approx(stats.norm.logsf((0.9995 - 1 / 255 - 0.99) / 0.01), rel=1e-4)


def test_kl_variance_part_is_accurate_across_its_series_switch():
    x = np.concatenate([-np.logspace(-8, 1, 60), np.logspace(-8, 1, 60), [0.0999, 0.1, 0.1001, -0.0999, -0.1001]])
    got = np.asarray(V._x_plus_expm1_neg(jnp.asarray(x, jnp.float32)), np.float64)
    x32 = np.asarray(x, np.float32).astype(np.float64)  # the value the function was given
    want = x32 + np.expm1(-x32)
    np.testing.assert_allclose(got, want, rtol=5e-6, atol=0)
    grad = np.asarray(jax.vmap(jax.grad(V._x_plus_expm1_neg))(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(grad, -np.expm1(-x32), rtol=1e-6)
