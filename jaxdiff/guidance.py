"""Guidance as transforms from a denoiser to a denoiser, composable with every sampler.

Every sampler sees one model interface, ``denoise(x, t) -> x0_hat``
(:mod:`jaxdiff.parameterization`). Each function here takes a denoiser (or a conditional one,
``denoise_cond(x, t, c)``) and returns a new ``denoise(x, t)``, so guidance is chosen
independently of the sampler::

    d = guidance.classifier_free_guidance(denoise_cond, y, null, scale=3.0,
                                          interval=(0.3, 5.0), process=process)
    x0 = samplers.get("dpmpp_2m")(d, x_T, grid)

Guidance on x0 equals guidance on eps, v or the score: for fixed ``(x, t)`` each of these is an
affine function of x0, and classifier-free guidance combines two predictions with weights that sum
to one, so the combination commutes with the change of variables. Adding ``g`` to the score is
adding ``sigma^2 / alpha * g`` to x0 (score = (alpha x0 - x) / sigma^2), which is how classifier
and training-free guidance enter here.

* :func:`classifier_free_guidance` -- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance",
  Eq. 6; conditional and unconditional branches batched in one model call; an optional guidance
  interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models", Sec. 3) and CFG rescale (Lin et al. 2024, "Common
  Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4, Alg. 2).
* :func:`classifier_guidance` -- Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
  Synthesis", Sec. 4 (the score form of their Alg. 2 / Eq. 14; their Alg. 1 applies the same
  gradient as a shift of the DDPM mean) with a noise-aware classifier ``log p(y | x_t, t)``.
* :func:`training_free_guidance` -- Ye et al. 2024, "TFG: Unified Training-Free Guidance for
  Diffusion Models", Alg. 1: mean guidance (gradient steps on the x0 estimate), variance guidance
  (gradient with respect to x_t through the denoiser) and the Gaussian-smoothed predictor, with an
  off-the-shelf predictor ``log f(y | x0)`` trained on clean data.
* :func:`with_recurrence` -- TFG's recurrence (Bansal et al. 2023's "time travel"): a sampler
  transform that repeats every step ``n`` times, re-noising back to the step's start in between.

Guidance scales and strengths may be traced values: changing them under ``jax.jit`` does not
recompile.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdiff.parameterization import _bcast
from jaxdiff.processes import Process
from jaxdiff.schedules import Grid

__all__ = [
    "classifier_free_guidance",
    "rescale_guidance",
    "in_interval",
    "classifier_guidance",
    "training_free_guidance",
    "smoothed_log_likelihood",
    "with_recurrence",
    "MULTISTEP_SAMPLERS",
    "renoise",
    "RESCALE_SPACES",
]

RESCALE_SPACES = ("x0", "eps", "v")


def _is_zero(v) -> bool:
    """True only for a Python/NumPy literal zero (a traced value is never skipped)."""
    return isinstance(v, (int, float)) and float(v) == 0.0


def in_interval(process: Process, t, interval) -> jax.Array:
    """Whether the noise level ``sigma(t) / alpha(t)`` (EDM's / k-diffusion's sigma) lies in
    ``(lo, hi]`` -- Kynkaanniemi et al. 2024's interval, in the EDM noise-level units their paper
    uses (for VE / EDM processes sigma/alpha is sigma itself)."""
    lo, hi = interval
    s = process.sigma_ratio(jnp.asarray(t, jnp.float32))
    return (s > lo) & (s <= hi)


def _to_space(space, x0, x, t, process):
    if space == "x0":
        return x0
    a, s = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    eps = (x - a * x0) / jnp.where(s == 0, 1.0, s)
    if space == "eps":
        return eps
    return a * eps - s * x0  # v


def _from_space(space, out, x, t, process):
    if space == "x0":
        return out
    a, s = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    if space == "eps":  # undefined where alpha = 0: _rescale_x0 replaces those entries
        return (x - s * out) / jnp.where(a == 0, 1.0, a)
    return (a * x - s * out) / (a**2 + s**2)  # v


def _rescale_x0(space, g, c, x, t, process, phi):
    """CFG rescale of the guided x0 ``g`` (conditional x0 ``c``) done in ``space``, returned as x0.

    In eps space, x0 = (x - sigma eps) / alpha has no value where alpha = 0 -- t_max of
    RectifiedFlow and of zero-terminal-SNR DiscreteVP, where samplers start. With
    f = std(eps_c) / std(eps_g) = std(x - alpha c) / std(x - alpha g), the rescaled x0 is
    ``g - phi (x - alpha g) (f - 1) / alpha``, whose limit as alpha -> 0 (x, g, c fixed) is

        g - phi * x * cov(x, g - c) / var(x)      (per example, over the non-batch axes),

    and that is what is returned where alpha = 0: finite, continuous in t, and the un-rescaled
    guided x0 ``g`` itself where x is uncorrelated with the guidance direction g - c (or var(x) = 0).
    """
    out = _from_space(space, rescale_guidance(_to_space(space, g, x, t, process),
                                              _to_space(space, c, x, t, process), phi), x, t, process)
    if space != "eps":
        return out
    axes = tuple(range(1, x.ndim))
    xc = x - jnp.mean(x, axis=axes, keepdims=True)
    var = jnp.mean(xc**2, axis=axes, keepdims=True)
    cov = jnp.mean(xc * (g - c), axis=axes, keepdims=True)  # 0 wherever var is
    at_zero_alpha = g - jnp.asarray(phi, g.dtype) * x * cov / jnp.where(var == 0, 1.0, var)
    return jnp.where(_bcast(process.alpha(t), x) == 0, at_zero_alpha, out)


def rescale_guidance(guided, cond, phi):
    """CFG rescale (Lin et al. 2024, Alg. 2): match the per-example standard deviation of the
    guided prediction to the conditional one's, blended with weight ``phi``:

        out = phi * guided * std(cond) / std(guided) + (1 - phi) * guided

    (diffusers' ``rescale_noise_cfg`` with ``guidance_rescale=phi``.)"""
    axes = tuple(range(1, guided.ndim))
    std_c = jnp.std(cond, axis=axes, keepdims=True)
    std_g = jnp.std(guided, axis=axes, keepdims=True)
    factor = std_c / jnp.where(std_g == 0, 1.0, std_g)
    return phi * guided * factor + (1.0 - phi) * guided


def _concat(a, b):
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def classifier_free_guidance(
    denoise_cond: Callable,
    cond: Any,
    uncond: Any,
    scale,
    *,
    interval: tuple[float, float] | None = None,
    rescale=0.0,
    rescale_space: str = "x0",
    process: Process | None = None,
    channels: int | None = None,
) -> Callable:
    """Classifier-free guidance: ``D = D(x, t, uncond) + scale * (D(x, t, cond) - D(x, t, uncond))``.

    Args:
      denoise_cond: ``denoise_cond(x, t, c) -> x0_hat`` where ``c`` is a batch of conditions
        (a pytree whose leaves have the batch as leading axis, e.g. int labels ``(B,)``). It may
        return ``(x0_hat, v)`` (learned variances, :mod:`jaxdiff.variance`): x0_hat is guided and
        ``v`` taken from the conditional branch (as DiT's ``forward_with_cfg`` samples it).
      cond, uncond: the conditions of the two branches (same structure; ``uncond`` is the null
        condition the model was trained with under label dropout, e.g. label ``num_classes`` for
        jaxdiff's nets -- see :func:`jaxdiff.modeling.null_labels`). Both branches run in one
        model call on a batch of ``2B``.
      scale: the guidance scale ``w`` (Ho & Salimans' ``1 + w``): 1 is the conditional model, 0 the
        unconditional one. May be traced.
      interval: ``(lo, hi)``: guide only where ``sigma / alpha`` is in ``(lo, hi]``; elsewhere the
        conditional model alone is evaluated (one call on ``B`` examples, skipped branch not
        computed when ``t`` is a scalar). Needs ``process``.
      rescale: CFG rescale ``phi`` in [0, 1] (0 = off; Lin et al. suggest 0.7). May be traced.
      rescale_space: the prediction whose standard deviation is rescaled: ``"x0"`` (default),
        ``"eps"`` (what diffusers' pipelines rescale for epsilon models) or ``"v"`` (Lin et al.'s
        v-prediction models). Needs ``process`` unless ``"x0"``. Where alpha = 0 (t_max of
        RectifiedFlow and zero-terminal-SNR DiscreteVP) eps does not determine x0; there eps-space
        rescaling returns its limit as alpha -> 0, ``g - rescale * x * cov(x, g - c) / var(x)``
        per example (g, c the guided and conditional x0), which is g when x and g - c are
        uncorrelated.
      process: the forward process (for ``interval`` and for rescaling in eps / v space).
      channels: guide only the first ``channels`` channels (last axis); the others take the
        conditional branch. DiT's ``forward_with_cfg`` guides 3 of its 4 latent channels "by
        default for exact reproducibility" (Peebles & Xie 2023's code); guiding x0 per channel is
        guiding eps per channel (x0 and eps are affine in each other channel by channel). None:
        all channels.

    Returns:
      ``denoise(x, t) -> x0_hat``, guided.
    """
    if channels is not None and int(channels) < 1:
        raise ValueError(f"classifier_free_guidance: channels must be >= 1 (or None: all), got {channels!r}")
    if rescale_space not in RESCALE_SPACES:
        raise ValueError(f"rescale_space must be one of {RESCALE_SPACES}, got {rescale_space!r}")
    if interval is not None:
        if process is None:
            raise ValueError("classifier_free_guidance: a guidance interval needs process=... "
                             "(the interval is in units of sigma/alpha)")
        if len(interval) != 2 or not interval[0] < interval[1]:
            raise ValueError(f"interval must be (lo, hi) with lo < hi, got {interval!r}")
    do_rescale = not _is_zero(rescale)
    if do_rescale and rescale_space != "x0" and process is None:
        raise ValueError(f"classifier_free_guidance: rescale_space={rescale_space!r} needs process=...")

    def guided_both(x, t):
        b = x.shape[0]
        tt = t if t.ndim == 0 else jnp.concatenate([t, t])
        out = denoise_cond(jnp.concatenate([x, x]), tt, _concat(cond, uncond))
        aux = None
        if isinstance(out, tuple):  # (x0_hat, v): learned variances come from the conditional branch
            out, aux = out
        c, u = out[:b], out[b:]
        g = u + jnp.asarray(scale, out.dtype) * (c - u)
        if channels is not None and int(channels) < out.shape[-1]:
            g = jnp.where(jnp.arange(out.shape[-1]) < int(channels), g, c)
        if do_rescale:
            g = _rescale_x0(rescale_space, g, c, x, t, process, rescale).astype(out.dtype)
        return g if aux is None else (g, aux[:b])

    def conditional_only(x, t):
        return denoise_cond(x, t, cond)

    def denoise(x, t):
        t = jnp.asarray(t, jnp.float32)
        if interval is None:
            return guided_both(x, t)
        inside = in_interval(process, t, interval)
        if t.ndim == 0:
            return jax.lax.cond(inside, guided_both, conditional_only, x, t)
        return jax.tree.map(lambda g, c: jnp.where(_bcast(inside, g), g, c), guided_both(x, t), conditional_only(x, t))

    return denoise


def _score_to_x0(process: Process, t, x):
    """``sigma^2 / alpha``: how a score term moves x0 (score = (alpha x0 - x) / sigma^2), broadcast
    to ``x``; 0 where alpha = 0 (t_max of RectifiedFlow and zero-terminal-SNR DiscreteVP), where
    x_t holds no information about x0 and the term has no finite value: no guidance there."""
    a, s = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    return jnp.where(a == 0, 0.0, s**2 / jnp.where(a == 0, 1.0, a))


def classifier_guidance(denoise: Callable, log_prob: Callable, process: Process, scale) -> Callable:
    """Classifier guidance: add ``scale * grad_x log p(y | x_t)`` to the score.

    ``log_prob(x, t) -> (B,)`` is the log-probability a noise-aware classifier gives the wanted
    class of each example of ``x`` at time ``t`` (e.g. ``log_softmax(logits)[arange(B), y]``;
    jaxdiff trains one with :func:`jaxdiff.train.classifier.train_noisy_classifier`). Since
    score = (alpha x0 - x) / sigma^2, this is ``x0 + scale * sigma^2 / alpha * grad``
    (Dhariwal & Nichol 2021, Sec. 4, the score form of their Alg. 2; ``scale`` is their ``s``;
    1 samples p(x | y) exactly when the denoiser and classifier are exact). Where alpha = 0 the
    term has no finite value and is left out (the unguided x0; RectifiedFlow and
    zero-terminal-SNR grids start there).
    """

    def guided(x, t):
        t = jnp.asarray(t, jnp.float32)
        x0 = denoise(x, t)
        grad = jax.grad(lambda z: jnp.sum(log_prob(z, t)))(x)
        return (x0 + jnp.asarray(scale, jnp.float32) * _score_to_x0(process, t, x) * grad).astype(x0.dtype)

    return guided


def smoothed_log_likelihood(log_likelihood: Callable, x0, std, key, num_samples: int):
    """TFG's Gaussian-smoothed predictor ``log E_delta f(y | x0 + std * delta)``, estimated with
    ``num_samples`` draws (log-mean-exp over the draws; ``std == 0``: ``log f`` itself)."""
    if num_samples <= 0:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    delta = jax.random.normal(key, (num_samples,) + x0.shape, x0.dtype)
    std = _bcast(std, x0)
    lls = jax.vmap(lambda d: log_likelihood(x0 + std * d))(delta)  # (S, B)
    return jax.nn.logsumexp(lls, axis=0) - jnp.log(float(num_samples))


def _t_key(key, t):
    """A key that depends on t (so every step draws different smoothing noise)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32).reshape(-1)[0], jnp.uint32)
    return jax.random.fold_in(key, bits)


def training_free_guidance(
    denoise: Callable,
    log_likelihood: Callable,
    process: Process,
    *,
    mean_strength=0.0,
    variance_strength=0.0,
    mean_iters: int = 1,
    smoothing=0.0,
    num_samples: int = 1,
    max_update_norm=None,
    key=None,
) -> Callable:
    """Training-free guidance with an off-the-shelf predictor (Ye et al. 2024, TFG, Alg. 1).

    ``log_likelihood(x0) -> (B,)`` is ``log f(y | x0)`` of a predictor trained on *clean* data
    (a classifier's log-probability of the wanted class; a negative loss for other targets). Let
    ``f~`` be its smoothing ``log E f(y | x0 + smoothing * sigma(t) * delta)`` (TFG's
    ``gamma * sqrt(1 - abar_t)``; ``num_samples`` Monte-Carlo draws). From ``x0 = D(x, t)``:

    * mean guidance (TFG's Delta_0): ``mean_iters`` gradient steps ``x0 += mean_strength *
      grad_x0 f~(x0)`` on the x0 estimate, with the denoiser held fixed;
    * variance guidance (TFG's Delta_t): ``variance_strength * grad_{x_t} f~(D(x_t, t))``, the
      gradient through the denoiser, added to the score (``+ sigma^2/alpha *`` it on x0), i.e.
      classifier guidance with the predictor composed with the denoiser;
    * recurrence: wrap the sampler with :func:`with_recurrence`.

    The returned denoiser is ``x0 + Delta_0 + sigma^2/alpha * variance_strength * grad``. TFG
    applies Delta_0 and Delta_t to a DDIM step's x0 term and to x_{t-1}; as a denoiser transform
    the same two directions enter through x0, which makes them composable with every sampler.
    ``max_update_norm``: if set, each example's total change of x0 (Delta_0 plus the variance
    term) is scaled down to at most this L2 norm -- the role of the gradient clipping in TFG's
    reference code; through an eps-predicting denoiser ``grad_{x_t}`` carries a ``1/alpha`` factor
    that makes the unclipped variance term explode at high noise for large strengths.
    ``key``: PRNG key for the smoothing noise (needed if ``smoothing != 0``), folded with t.
    """
    if not isinstance(mean_iters, int) or mean_iters < 0:
        raise ValueError(f"mean_iters must be an int >= 0, got {mean_iters!r}")
    smooth = not _is_zero(smoothing)
    if smooth and key is None:
        raise ValueError("training_free_guidance: smoothing != 0 needs key=jax.random.key(...)")
    use_var = not _is_zero(variance_strength)
    use_mean = not _is_zero(mean_strength) and mean_iters > 0

    def guided(x, t):
        t = jnp.asarray(t, jnp.float32)
        k = _t_key(key, t) if smooth else None
        std = smoothing * process.sigma(t) if smooth else 0.0

        def f(x0):
            if not smooth:
                return log_likelihood(x0)
            return smoothed_log_likelihood(log_likelihood, x0, std, k, num_samples)

        if use_var:
            def total(z):
                x0 = denoise(z, t)
                return jnp.sum(f(x0)), x0

            g_t, x0 = jax.grad(total, has_aux=True)(x)
        else:
            x0 = denoise(x, t)
        out = x0.astype(jnp.float32)
        if use_mean:
            grad_f = jax.grad(lambda z: jnp.sum(f(z)))

            def body(_, z):
                return z + jnp.asarray(mean_strength, jnp.float32) * grad_f(z)

            x0_m = jax.lax.fori_loop(0, mean_iters, body, out)
            out = x0_m
        if use_var:
            out = out + jnp.asarray(variance_strength, jnp.float32) * _score_to_x0(process, t, x) * g_t
        if max_update_norm is not None:
            base = x0.astype(jnp.float32)
            delta = out - base
            norm = jnp.sqrt(jnp.sum(delta**2, axis=tuple(range(1, delta.ndim)), keepdims=True))
            out = base + delta * jnp.minimum(1.0, max_update_norm / jnp.maximum(norm, 1e-12))
        return out.astype(x0.dtype)

    return guided


def renoise(x_next, grid_from: tuple, grid_to: tuple, key):
    """Sample ``x_t | x_s`` of the forward process from the later point ``s`` (less noise) back
    to ``t``: ``x_t = (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) eps``.
    ``grid_from = (alpha_s, sigma_s)``, ``grid_to = (alpha_t, sigma_t)``."""
    a_s, s_s = grid_from
    a_t, s_t = grid_to
    r = a_t / a_s
    var = jnp.maximum(s_t**2 - (r * s_s) ** 2, 0.0)
    eps = jax.random.normal(key, x_next.shape, jnp.float32)
    return (r * x_next + jnp.sqrt(var) * eps).astype(x_next.dtype)


MULTISTEP_SAMPLERS = ("dpm_solver", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmpp_3m_sde", "deis",
                      "lms", "ipndm", "ipndm_v", "unipc", "pndm", "plms")
"""jaxdiff's registered samplers that :func:`with_recurrence` refuses (history across grid steps)."""


def with_recurrence(sampler: Callable, num_recurrences: int) -> Callable:
    """TFG's recurrence (Ye et al. 2024, Alg. 1; Bansal et al. 2023, "Universal Guidance", Sec. 3.3):
    run each step of ``sampler`` ``num_recurrences`` times, re-noising the result back to the
    step's start (:func:`renoise`) between repeats; the last repeat's result is kept.

    ``sampler`` must be one-step (nothing carried between grid steps): ddim, ddpm, euler, heun,
    dpm2, euler_ancestral, dpm2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, flow_euler, flow_heun,
    ... Each step runs it on the two-point grid of that step, where a multistep sampler (and the
    singlestep ``dpm_solver``, whose intermediate points are grid points) would fall back to its
    first-order step: jaxdiff's registered ones (:data:`MULTISTEP_SAMPLERS`) are refused. Returns a
    sampler with the usual signature (it needs ``key``).
    """
    if not isinstance(num_recurrences, int) or num_recurrences < 1:
        raise ValueError(f"num_recurrences must be an int >= 1, got {num_recurrences!r}")
    name = getattr(getattr(sampler, "func", sampler), "__name__", None)
    if name in MULTISTEP_SAMPLERS:
        raise ValueError(f"with_recurrence: {name} carries information between grid steps (or takes "
                         "its intermediate points from the grid), so on each step's two-point grid it "
                         "would run as a first-order method; use a one-step sampler (ddim, euler, heun, "
                         "dpm2, dpmpp_2s_ancestral, ...)")

    def run(denoise, x, grid: Grid, *, key=None, **options):
        if key is None and num_recurrences > 1:
            raise ValueError("with_recurrence: re-noising needs key=jax.random.key(...)")
        key = key if key is not None else jax.random.key(0)
        n = grid.t.shape[0] - 1

        def step(x, i):
            sub = Grid(t=jax.lax.dynamic_slice(grid.t, (i,), (2,)),
                       alpha=jax.lax.dynamic_slice(grid.alpha, (i,), (2,)),
                       sigma=jax.lax.dynamic_slice(grid.sigma, (i,), (2,)),
                       process=grid.process)
            k_i = jax.random.fold_in(key, i)

            def repeat(r, x_t):
                k_s, k_n = jax.random.split(jax.random.fold_in(k_i, r))
                x_next = sampler(denoise, x_t, sub, key=k_s, **options)
                back = renoise(x_next, (sub.alpha[1], sub.sigma[1]), (sub.alpha[0], sub.sigma[0]), k_n)
                return back, x_next

            def body(r, carry):
                x_t, _ = carry
                return repeat(r, x_t)

            _, x_next = jax.lax.fori_loop(0, num_recurrences, body, (x, x))
            return x_next, None

        x, _ = jax.lax.scan(step, x, jnp.arange(n))
        return x

    return run
