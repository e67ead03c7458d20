"""Guidance transforms (jaxdiff.guidance) on closed-form targets and on a small conditional net.

The 2-D Gaussian mixture has an exact conditional denoiser E[x0 | x_t, y] (y = component; the
null label = the whole mixture) and an exact noisy classifier p(y | x_t), so guidance can be
checked against what it should sample, not only against itself.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import guidance, samplers
from jaxdiff import parameterization as PZ
from jaxdiff import processes as P
from jaxdiff.schedules import make_grid

PROC = P.VPLinear(beta_min=0.1, beta_max=20.0, t_min=1e-3, t_max=1.0)
K = 8
ANGLES = np.arange(K) * 2 * np.pi / K
MEANS = jnp.asarray(2.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), jnp.float32)
WEIGHTS = jnp.full((K,), 1.0 / K)
C = 0.2  # component std
NULL = K


def _coeffs(x, t, c, proc=PROC):
    """alpha, sigma as (B, 1, 1) and the marginal variance of a component alpha^2 c^2 + sigma^2."""
    b = x.shape[0]
    a = jnp.broadcast_to(jnp.asarray(proc.alpha(t), jnp.float32), (b,))[:, None, None]
    s = jnp.broadcast_to(jnp.asarray(proc.sigma(t), jnp.float32), (b,))[:, None, None]
    return a, s, a**2 * c**2 + s**2


def _component_logits(x, t, means=MEANS, weights=WEIGHTS, c=C, proc=PROC):
    """log w_k N(x; alpha mu_k, (alpha^2 c^2 + sigma^2) I) up to a constant: (B, K)."""
    a, _, v = _coeffs(x, t, c, proc)
    diff = x[:, None, :] - a * means[None]
    return jnp.log(weights)[None] - 0.5 * jnp.sum(diff**2, -1) / v[..., 0]


def exact_denoise_cond(x, t, y, means=MEANS, weights=WEIGHTS, c=C, proc=PROC):
    """E[x0 | x_t, y] for component y, or for the whole mixture where y == NULL (any process)."""
    a, _, v = _coeffs(x, t, c, proc)
    logits = _component_logits(x, t, means, weights, c, proc)
    onehot = jax.nn.one_hot(jnp.minimum(y, len(weights) - 1), len(weights))
    logits = jnp.where((y == NULL)[:, None], logits, jnp.where(onehot > 0, 0.0, -jnp.inf))
    w = jax.nn.softmax(logits, axis=1)
    diff = x[:, None, :] - a * means[None]
    comp = means[None] + (a * c**2 / v) * diff
    return jnp.sum(w[..., None] * comp, axis=1)


def exact_log_prob(y):
    """log p(y | x_t) of the mixture: the exact noise-aware classifier."""

    def log_prob(x, t):
        lg = jax.nn.log_softmax(_component_logits(x, t), axis=1)
        return jnp.take_along_axis(lg, y[:, None], axis=1)[:, 0]

    return log_prob


def nearest_component(x):
    return np.asarray(jnp.argmin(jnp.sum((x[:, None] - MEANS[None]) ** 2, -1), axis=1))


def _x_T(n, seed=0):
    grid = make_grid(PROC, 30, "logsnr")
    return grid, grid.prior_sample(jax.random.key(seed), (n, 2))


# ------------------------------------------------------------------------------------------
# classifier-free guidance
# ------------------------------------------------------------------------------------------


def test_cfg_scale_one_equals_conditional_model_and_batches_both_branches():
    grid, x = _x_T(64)
    y = jnp.arange(64) % K
    seen = []

    def denoise_cond(x, t, c):
        seen.append(x.shape[0])
        return exact_denoise_cond(x, t, c)

    d = guidance.classifier_free_guidance(denoise_cond, y, jnp.full_like(y, NULL), 1.0)
    out = samplers.get("dpmpp_2m")(d, x, grid)
    ref = samplers.get("dpmpp_2m")(lambda x, t: exact_denoise_cond(x, t, y), x, grid)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
    assert seen and seen[0] == 128, seen  # each model call sees 2B = 128 examples (both branches)
    # scale 0 is the unconditional model
    d0 = guidance.classifier_free_guidance(exact_denoise_cond, y, jnp.full_like(y, NULL), 0.0)
    ref0 = samplers.get("dpmpp_2m")(lambda x, t: exact_denoise_cond(x, t, jnp.full_like(y, NULL)), x, grid)
    np.testing.assert_allclose(samplers.get("dpmpp_2m")(d0, x, grid), ref0, rtol=0, atol=2e-5)


def test_cfg_on_the_first_channels_only_as_dits_forward_with_cfg():
    """DiT's code guides eps on 3 of 4 latent channels, the rest (and the variances) conditional:
    guiding x0 per channel is the same, since x0 = (x - sigma eps) / alpha channel by channel."""
    proc = P.discrete_vp()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 4))
    y = jnp.array([0, 1])
    w = jax.random.normal(jax.random.key(1), (3, 4))  # a label-dependent stand-in eps network

    def eps_net(x, c):
        return jnp.tanh(x) * (1.0 + w[c][:, None, None, :])

    def denoise_cond(x, t, c):
        return PZ.to_x0("epsilon", eps_net(x, c), x, t, proc)

    t = jnp.float32(500.0)
    out = guidance.classifier_free_guidance(denoise_cond, y, jnp.full_like(y, 2), 4.0, channels=3)(x, t)
    e_c, e_u = eps_net(x, y), eps_net(x, jnp.full_like(y, 2))
    eps = jnp.concatenate([e_u[..., :3] + 4.0 * (e_c[..., :3] - e_u[..., :3]), e_c[..., 3:]], axis=-1)
    np.testing.assert_allclose(out, PZ.to_x0("epsilon", eps, x, t, proc), rtol=1e-5, atol=1e-5)
    full = guidance.classifier_free_guidance(denoise_cond, y, jnp.full_like(y, 2), 4.0, channels=4)(x, t)
    assert not np.allclose(full[..., 3], out[..., 3])
    with pytest.raises(ValueError, match="channels must be >= 1"):
        guidance.classifier_free_guidance(denoise_cond, y, y, 4.0, channels=0)


@pytest.mark.parametrize("per_example_t", [False, True])
def test_cfg_interval_excluding_every_step_equals_unguided_conditional(per_example_t):
    grid, x = _x_T(32)
    y = jnp.arange(32) % K
    null = jnp.full_like(y, NULL)
    max_level = float(jnp.max(grid.sigma / grid.alpha))

    def wrap(d):
        if not per_example_t:
            return d
        return lambda x, t: d(x, jnp.full((x.shape[0],), t))

    outside = guidance.classifier_free_guidance(exact_denoise_cond, y, null, 4.0, process=PROC,
                                                interval=(2 * max_level, 4 * max_level))
    cond = lambda x, t: exact_denoise_cond(x, t, y)  # noqa: E731
    np.testing.assert_allclose(samplers.get("heun")(wrap(outside), x, grid), samplers.get("heun")(wrap(cond), x, grid),
                               rtol=0, atol=1e-6)
    # an interval covering every step equals CFG without an interval
    everywhere = guidance.classifier_free_guidance(exact_denoise_cond, y, null, 4.0, process=PROC,
                                                   interval=(0.0, 2 * max_level))
    plain = guidance.classifier_free_guidance(exact_denoise_cond, y, null, 4.0)
    np.testing.assert_allclose(samplers.get("heun")(wrap(everywhere), x, grid),
                               samplers.get("heun")(wrap(plain), x, grid), rtol=0, atol=1e-6)


def test_cfg_interval_guides_only_inside():
    """Per call: inside the interval the output is CFG's, outside it is the conditional model's."""
    x = jax.random.normal(jax.random.key(1), (16, 2))
    y = jnp.arange(16) % K
    null = jnp.full_like(y, NULL)
    d = guidance.classifier_free_guidance(exact_denoise_cond, y, null, 3.0, process=PROC, interval=(0.5, 2.0))
    plain = guidance.classifier_free_guidance(exact_denoise_cond, y, null, 3.0)
    for t in (0.05, 0.3, 0.9):
        level = float(PROC.sigma_ratio(jnp.float32(t)))
        ref = plain(x, t) if 0.5 < level <= 2.0 else exact_denoise_cond(x, t, y)
        np.testing.assert_allclose(d(x, t), ref, rtol=0, atol=1e-6)
    assert any(0.5 < float(PROC.sigma_ratio(jnp.float32(t))) <= 2.0 for t in (0.05, 0.3, 0.9))
    assert any(not 0.5 < float(PROC.sigma_ratio(jnp.float32(t))) <= 2.0 for t in (0.05, 0.3, 0.9))


def test_cfg_rescale_eps_space_matches_diffusers_rescale_noise_cfg():
    torch = pytest.importorskip("torch")
    rescale_noise_cfg = pytest.importorskip(
        "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion").rescale_noise_cfg
    proc = P.discrete_vp(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    eps_c = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    eps_u = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    t = 600.0
    a, s = float(proc.alpha(t)), float(proc.sigma(t))

    def denoise_cond(x, t, c):  # an eps-model, as x0; c = 1 conditional, 0 unconditional
        eps = jnp.where(c[:, None, None, None] == 1, jnp.concatenate([eps_c, eps_c]), jnp.concatenate([eps_u, eps_u]))
        return (x - s * eps) / a

    w, phi = 5.0, 0.7
    d = guidance.classifier_free_guidance(denoise_cond, jnp.ones(3, jnp.int32), jnp.zeros(3, jnp.int32), w,
                                          rescale=phi, rescale_space="eps", process=proc)
    x0 = np.asarray(d(x, t))
    eps_out = (np.asarray(x) - a * x0) / s
    # diffusers works in NCHW; the statistics are per example, so the layout does not matter
    cfg = torch.from_numpy(eps_u + w * (eps_c - eps_u)).permute(0, 3, 1, 2)
    ref = rescale_noise_cfg(cfg, torch.from_numpy(eps_c).permute(0, 3, 1, 2), guidance_rescale=phi)
    np.testing.assert_allclose(eps_out, ref.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)


def test_cfg_rescale_matches_conditional_std():
    x = jax.random.normal(jax.random.key(3), (8, 2))
    y = jnp.arange(8) % K
    d = guidance.classifier_free_guidance(exact_denoise_cond, y, jnp.full_like(y, NULL), 6.0, rescale=1.0)
    out = d(x, 0.5)
    cond = exact_denoise_cond(x, 0.5, y)
    np.testing.assert_allclose(jnp.std(out, axis=1), jnp.std(cond, axis=1), rtol=1e-4)


def _toy_denoise_cond(x, t, c):
    """A finite conditional x0 model that still depends on x at alpha = 0 (so cov(x, g - c) != 0)."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))[:, None]
    shift = jnp.where((c == NULL)[:, None], 0.0, jnp.take(MEANS, jnp.minimum(c, K - 1), axis=0)[:, :1])
    return shift + 0.3 * jnp.tanh(x) * (1.0 + t / 1000.0) + 0.1 * c[:, None].astype(jnp.float32) * x**2 / 8


def _eps_rescale_ref(g, c, x, a, s, phi):
    """The eps-space CFG rescale as written before (x0 = (x - s eps) / a), in float64 (a, s: (B, 1))."""
    g, c, x = (np.asarray(v, np.float64) for v in (g, c, x))
    eg, ec = (x - a * g) / s, (x - a * c) / s
    f = ec.std(axis=1, keepdims=True) / eg.std(axis=1, keepdims=True)
    return (x - s * (phi * eg * f + (1 - phi) * eg)) / a


@pytest.mark.parametrize("proc", [P.RectifiedFlow(), P.discrete_vp("linear", rescale_betas_zero_snr=True)],
                         ids=["rectified_flow", "discrete_zero_snr"])
def test_cfg_rescale_eps_space_is_finite_at_zero_alpha(proc):
    """At t_max alpha = 0 and x0 = (x - sigma eps) / alpha is 0/0: the output there is the limit
    g - phi x cov(x, g - c) / var(x); elsewhere (per-example t too) the formula is unchanged."""
    n, dim, w, phi = 6, 8, 3.0, 0.7
    x = jax.random.normal(jax.random.key(5), (n, dim))
    y = jnp.arange(n) % K
    null = jnp.full_like(y, NULL)
    d = guidance.classifier_free_guidance(_toy_denoise_cond, y, null, w, rescale=phi, rescale_space="eps",
                                          process=proc)
    t_max = proc.t_max
    assert float(proc.alpha(t_max)) == 0.0
    out = np.asarray(d(x, t_max))
    assert np.all(np.isfinite(out))
    c, u = _toy_denoise_cond(x, t_max, y), _toy_denoise_cond(x, t_max, null)
    g = np.asarray(u + w * (c - u), np.float64)
    xn = np.asarray(x, np.float64)
    xc = xn - xn.mean(1, keepdims=True)
    cov = (xc * (g - np.asarray(c, np.float64))).mean(1, keepdims=True)
    limit = g - phi * xn * cov / (xc**2).mean(1, keepdims=True)
    np.testing.assert_allclose(out, limit, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(limit - g)) > 1e-3  # the correction is not vacuous here
    # continuity: the old formula just inside t_max tends to it (the error is O(alpha))
    near = t_max - (1e-3 if proc.t_max == 1.0 else 0.0)
    if not proc.discrete:  # DiscreteVP's alpha is 0 on all of (t_max - 1, t_max]
        a, s = float(proc.alpha(near)), float(proc.sigma(near))
        cn, un = _toy_denoise_cond(x, near, y), _toy_denoise_cond(x, near, null)
        ref = _eps_rescale_ref(un + w * (cn - un), cn, x, a, s, phi)
        np.testing.assert_allclose(out, ref, atol=5e-3)
    # away from t_max, and per-example t mixing both: the formula as before
    ts = jnp.asarray([t_max, 0.3 * t_max, 0.7 * t_max, 0.95 * t_max, t_max, 0.5 * t_max], jnp.float32)
    out_b = np.asarray(d(x, ts))
    a = np.asarray(proc.alpha(ts), np.float64)[:, None]
    s = np.asarray(proc.sigma(ts), np.float64)[:, None]
    cb, ub = _toy_denoise_cond(x, ts, y), _toy_denoise_cond(x, ts, null)
    inside = a[:, 0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ref = _eps_rescale_ref(ub + w * (cb - ub), cb, x, a, s, phi)
    # float32 cancellation in (x - s eps) / a grows like 1 / a: compare within that
    tol = 1e-4 * np.abs(ref) + 1e-6 * (1 + np.abs(np.asarray(x))) / np.where(inside, a[:, 0], 1.0)[:, None]
    assert np.all(np.abs(out_b - ref)[inside] <= tol[inside])
    np.testing.assert_allclose(out_b[~inside], limit[~inside], rtol=1e-5, atol=1e-5)
    for t in (0.3 * t_max, 0.95 * t_max):
        a, s = float(proc.alpha(t)), float(proc.sigma(t))
        cs, us = _toy_denoise_cond(x, t, y), _toy_denoise_cond(x, t, null)
        ref = _eps_rescale_ref(us + w * (cs - us), cs, x, a, s, phi)
        assert np.all(np.abs(np.asarray(d(x, t)) - ref) <= 1e-4 * np.abs(ref) + 1e-6 * (1 + np.abs(np.asarray(x))) / a)


def test_cfg_scale_is_traced_no_recompile():
    grid, x = _x_T(16)
    y = jnp.arange(16) % K
    traces = []

    @jax.jit
    def run(x, w, phi):
        traces.append(1)
        d = guidance.classifier_free_guidance(exact_denoise_cond, y, jnp.full_like(y, NULL), w, rescale=phi)
        return samplers.get("dpmpp_2m")(d, x, grid)

    outs = [run(x, w, 0.5) for w in (1.5, 3.0, 5.0)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[2])


def test_cfg_raises_component_accuracy_on_mixture_with_overlap():
    """A larger scale sends more samples to the requested component (measured fraction)."""
    means = MEANS * 0.4  # overlapping components: conditional sampling alone is not 100% accurate
    dc = lambda x, t, c: exact_denoise_cond(x, t, c, means=means)  # noqa: E731
    grid, x = _x_T(2048)
    y = jnp.arange(2048) % K
    fracs = []
    for w in (0.0, 1.0, 3.0):
        d = guidance.classifier_free_guidance(dc, y, jnp.full_like(y, NULL), w)
        out = samplers.get("dpmpp_2m")(d, x, grid)
        nearest = np.asarray(jnp.argmin(jnp.sum((out[:, None] - means[None]) ** 2, -1), axis=1))
        fracs.append(float(np.mean(nearest == np.asarray(y))))
    assert fracs[0] < 0.3 and fracs[0] < fracs[1] < fracs[2], fracs


@pytest.mark.parametrize("name", samplers.available())
def test_cfg_composes_with_every_sampler(name):
    """Every sampler takes the guided denoiser (interval and rescale on): samples keep shape and
    dtype, stay finite, and land in the requested component (measured at w=1.5, 16 steps, 256
    samples: >= 0.98 for every VP sampler vs 0.10-0.16 unguided). The rectified-flow samplers and
    consistency_multistep run on a rectified-flow process with the same exact mixture denoiser."""
    flow = name.startswith("flow") or name == "consistency_multistep"
    proc = P.RectifiedFlow() if flow else PROC
    grid = make_grid(proc, 16) if flow else make_grid(PROC, 16, "logsnr")
    x = grid.prior_sample(jax.random.key(0), (256, 2))
    y = jnp.arange(256) % K
    dc = lambda x, t, c: exact_denoise_cond(x, t, c, proc=proc)  # noqa: E731
    d = guidance.classifier_free_guidance(dc, y, jnp.full_like(y, NULL), 1.5,
                                          process=proc, interval=(0.1, 50.0), rescale=0.3)
    out = samplers.get(name)(d, x, grid, key=jax.random.key(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert bool(jnp.all(jnp.isfinite(out)))
    un = samplers.get(name)(lambda x, t: dc(x, t, jnp.full_like(y, NULL)), x, grid, key=jax.random.key(1))
    frac = lambda z: float(np.mean(nearest_component(z) == np.asarray(y)))  # noqa: E731
    assert frac(out) > 0.9 and frac(un) < 0.3, (frac(out), frac(un))


def test_cfg_validates():
    with pytest.raises(ValueError, match="needs process"):
        guidance.classifier_free_guidance(exact_denoise_cond, 0, 0, 2.0, interval=(0.1, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        guidance.classifier_free_guidance(exact_denoise_cond, 0, 0, 2.0, interval=(1.0, 0.1), process=PROC)
    with pytest.raises(ValueError, match="rescale_space"):
        guidance.classifier_free_guidance(exact_denoise_cond, 0, 0, 2.0, rescale_space="score")


# ------------------------------------------------------------------------------------------
# classifier guidance with the exact classifier
# ------------------------------------------------------------------------------------------


def test_classifier_guidance_with_exact_classifier_samples_requested_component():
    """Scale 1 with the exact p(y | x_t) turns the mixture's score into component y's score."""
    grid, x = _x_T(4096)
    y = jnp.arange(4096) % K
    uncond = lambda x, t: exact_denoise_cond(x, t, jnp.full((x.shape[0],), NULL))  # noqa: E731
    d = guidance.classifier_guidance(uncond, exact_log_prob(y), PROC, 1.0)
    out = samplers.get("heun")(d, x, grid)
    frac = float(np.mean(nearest_component(out) == np.asarray(y)))
    base = float(np.mean(nearest_component(samplers.get("heun")(uncond, x, grid)) == np.asarray(y)))
    assert frac > 0.995, frac  # measured 1.000 (4096 samples)
    assert base < 0.2, base  # unguided: measured 0.133 (chance 1/8)
    # and each class's samples have the component's moments (mean mu_y, std C)
    for k in (0, 3):
        s = np.asarray(out[np.asarray(y) == k])
        np.testing.assert_allclose(s.mean(0), np.asarray(MEANS[k]), atol=0.03)
        np.testing.assert_allclose(s.std(0), [C, C], rtol=0.1)


def test_classifier_guidance_equals_conditional_denoiser_exactly():
    """For the mixture, D(x, t) + sigma^2/alpha grad log p(y|x_t) is E[x0 | x_t, y] (Bayes)."""
    x = jax.random.normal(jax.random.key(2), (64, 2)) * 1.5
    y = jnp.arange(64) % K
    uncond = lambda x, t: exact_denoise_cond(x, t, jnp.full((x.shape[0],), NULL))  # noqa: E731
    d = guidance.classifier_guidance(uncond, exact_log_prob(y), PROC, 1.0)
    for t in (0.05, 0.3, 0.8):
        np.testing.assert_allclose(d(x, t), exact_denoise_cond(x, t, y), rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------------------
# training-free guidance with an off-the-shelf (clean-data) predictor
# ------------------------------------------------------------------------------------------


def _clean_log_likelihood(y):
    """An off-the-shelf predictor: p(y | x0) of the clean mixture (a classifier on clean data)."""

    def ll(x0):
        lg = jax.nn.log_softmax(-0.5 * jnp.sum((x0[:, None] - MEANS[None]) ** 2, -1) / C**2 + jnp.log(WEIGHTS)[None], 1)
        return jnp.take_along_axis(lg, y[:, None], axis=1)[:, 0]

    return ll


@pytest.mark.parametrize("opts,min_frac", [
    (dict(mean_strength=0.02, mean_iters=4), 0.95),
    (dict(variance_strength=0.5), 0.95),
    (dict(mean_strength=0.02, mean_iters=2, variance_strength=0.5, smoothing=0.2, num_samples=4), 0.95),
])
def test_training_free_guidance_raises_requested_fraction(opts, min_frac):
    grid, x = _x_T(1024)
    y = jnp.arange(1024) % K
    uncond = lambda x, t: exact_denoise_cond(x, t, jnp.full((x.shape[0],), NULL))  # noqa: E731
    d = guidance.training_free_guidance(uncond, _clean_log_likelihood(y), PROC, key=jax.random.key(5), **opts)
    out = samplers.get("ddim")(d, x, grid)
    assert bool(jnp.all(jnp.isfinite(out)))
    frac = float(np.mean(nearest_component(out) == np.asarray(y)))
    assert frac > min_frac, frac


def test_recurrence_raises_fraction_and_one_repeat_is_the_sampler():
    grid, x = _x_T(1024)
    y = jnp.arange(1024) % K
    uncond = lambda x, t: exact_denoise_cond(x, t, jnp.full((x.shape[0],), NULL))  # noqa: E731
    d = guidance.training_free_guidance(uncond, _clean_log_likelihood(y), PROC, mean_strength=0.003, mean_iters=1)
    ddim = samplers.get("ddim")
    once = guidance.with_recurrence(ddim, 1)(d, x, grid, key=jax.random.key(0))
    np.testing.assert_allclose(once, ddim(d, x, grid), rtol=0, atol=1e-5)
    for multistep in ("dpm_solver", "dpmpp_2m", "unipc"):
        with pytest.raises(ValueError, match=f"with_recurrence: {multistep} carries information"):
            guidance.with_recurrence(functools.partial(samplers.get(multistep), order=2)
                                     if multistep == "dpm_solver" else samplers.get(multistep), 2)
    thrice = guidance.with_recurrence(ddim, 3)(d, x, grid, key=jax.random.key(0))
    f1 = float(np.mean(nearest_component(once) == np.asarray(y)))
    f3 = float(np.mean(nearest_component(thrice) == np.asarray(y)))
    assert f3 > f1, (f1, f3)


def test_training_free_guidance_validates():
    with pytest.raises(ValueError, match="needs key"):
        guidance.training_free_guidance(lambda x, t: x, lambda x0: x0[:, 0], PROC, smoothing=0.1)
    with pytest.raises(ValueError, match="num_recurrences"):
        guidance.with_recurrence(samplers.get("ddim"), 0)


def test_training_free_guidance_max_update_norm_bounds_the_change():
    x = jax.random.normal(jax.random.key(4), (64, 2)) * 2
    y = jnp.arange(64) % K
    uncond = lambda x, t: exact_denoise_cond(x, t, jnp.full((x.shape[0],), NULL))  # noqa: E731
    free = guidance.training_free_guidance(uncond, _clean_log_likelihood(y), PROC, variance_strength=50.0,
                                           mean_strength=0.5, mean_iters=3)
    clipped = guidance.training_free_guidance(uncond, _clean_log_likelihood(y), PROC, variance_strength=50.0,
                                              mean_strength=0.5, mean_iters=3, max_update_norm=0.1)
    base = uncond(x, 0.5)
    n_free = jnp.linalg.norm(free(x, 0.5) - base, axis=1)
    n_clip = jnp.linalg.norm(clipped(x, 0.5) - base, axis=1)
    assert float(n_free.max()) > 0.1 and float(n_clip.max()) <= 0.1 + 1e-5
    small = n_free <= 0.1  # updates already within the bound are untouched
    np.testing.assert_allclose(n_clip[small], n_free[small], rtol=1e-5)


def test_classifier_and_training_free_guidance_are_finite_at_zero_alpha():
    """sigma^2 / alpha has no finite value where alpha = 0 (rectified flow at t = 1): there the
    guided x0 is the unguided one; just inside, the term is applied."""
    proc = P.RectifiedFlow()
    x = jax.random.normal(jax.random.key(3), (8, 2))
    den = lambda z, t: 0.5 * z  # noqa: E731
    log_prob = lambda z, t: -jnp.sum((z - 1.0) ** 2, axis=-1)  # noqa: E731
    cg = guidance.classifier_guidance(den, log_prob, proc, 2.0)
    np.testing.assert_array_equal(np.asarray(cg(x, 1.0)), np.asarray(den(x, 1.0)))
    inside = np.asarray(cg(x, 0.9))
    a, s = 0.1, 0.9
    np.testing.assert_allclose(inside, np.asarray(den(x, 0.9) + 2.0 * s**2 / a * -2.0 * (x - 1.0)), rtol=1e-5)
    tfg = guidance.training_free_guidance(den, lambda x0: -jnp.sum((x0 - 1.0) ** 2, axis=-1), proc,
                                          variance_strength=1.0)
    assert np.all(np.isfinite(np.asarray(tfg(x, 1.0))))
