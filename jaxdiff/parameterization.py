"""What a network predicts, and how its output becomes the one denoiser interface.

For ``x_t = alpha x0 + sigma eps`` the targets are related exactly:

* ``epsilon``  -- eps (Ho et al. 2020);
* ``sample``   -- x0;
* ``v_prediction`` -- v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4);
* ``score``    -- grad log p_t(x_t) = -eps / sigma (Song et al. 2021);
* ``velocity`` -- u = dx_t/dt = alpha'(t) x0 + sigma'(t) eps (flow matching; for the linear
  interpolant u = eps - x0);
* ``edm``      -- EDM preconditioning (Karras et al. 2022, Table 1): the network F sees
  ``c_in(s) x/alpha`` and ``c_noise(s)`` with s = sigma/alpha, and
  ``D = c_skip(s) x/alpha + c_out(s) F``.

:func:`to_x0` / :func:`from_x0` convert between any target and x0 (and hence between any two
targets); :func:`make_denoiser` wraps a raw network ``net(x, t_net) -> output`` into
``denoise(x, t) -> x0_hat``, the only model interface samplers and guidance see.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff.processes import Process

__all__ = [
    "PREDICTIONS",
    "check_x0_recoverable",
    "to_x0",
    "from_x0",
    "convert",
    "edm_precond",
    "edm_vp_coefficients",
    "net_inputs",
    "make_denoiser",
    "make_denoiser_with_variance",
    "Denoiser",
]

PREDICTIONS = ("epsilon", "sample", "v_prediction", "score", "velocity", "edm")

Denoiser = Callable  # denoise(x, t) -> x0_hat, t a scalar or shape (batch,)


def _bcast(c, x):
    """Broadcast a scalar or per-example (B,) coefficient against x (B, ...)."""
    c = jnp.asarray(c, jnp.float32)
    if c.ndim == 0:
        return c
    return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def _check(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def to_x0(prediction: str, out, x, t, process: Process):
    """x0 implied by a network output ``out`` of type ``prediction`` at (x, t).

    For ``"edm"`` ``out`` is the preconditioned denoiser's output D (already x0), not the raw
    network output F; :func:`make_denoiser` turns F into D (Karras et al. 2022, Eq. 7)."""
    _check(prediction)
    a, s = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    if prediction == "sample" or prediction == "edm":
        return out
    if prediction == "epsilon":
        return (x - s * out) / a
    if prediction == "v_prediction":
        # x0 = (alpha x - sigma v) / (alpha^2 + sigma^2); the denominator is 1 for VP.
        return (a * x - s * out) / (a**2 + s**2)
    if prediction == "score":
        return (x + s**2 * out) / a
    # velocity: x = a x0 + s eps, u = a' x0 + s' eps  =>  x0 = (s u - s' x) / (a' s - a s').
    da, ds = process.derivatives(t)
    da, ds = _bcast(da, x), _bcast(ds, x)
    return (s * out - ds * x) / (da * s - a * ds)


def from_x0(prediction: str, x0, x, t, process: Process):
    """The target of type ``prediction`` implied by x0 at (x, t)."""
    _check(prediction)
    a, s = _bcast(process.alpha(t), x), _bcast(process.sigma(t), x)
    if prediction == "sample" or prediction == "edm":
        return x0
    eps = (x - a * x0) / s
    if prediction == "epsilon":
        return eps
    if prediction == "v_prediction":
        return a * eps - s * x0
    if prediction == "score":
        return -eps / s
    da, ds = process.derivatives(t)
    return _bcast(da, x) * x0 + _bcast(ds, x) * eps


def check_x0_recoverable(prediction: str, process: Process, t: float, where: str = "") -> None:
    """Refuse a time ``t`` at which a ``prediction`` output determines no x0 (:func:`to_x0` would
    be infinite there, and a sampler starting there returns NaN): ``epsilon`` / ``score`` where
    alpha = 0 (x0 = (x - sigma eps) / alpha: zero-terminal-SNR chains at t_max, flows at t = 1),
    and ``velocity`` where alpha' sigma = alpha sigma' (the zero-terminal-SNR DDPM chain's last
    interval, where alpha = 0 throughout). ``v_prediction``, ``sample`` and ``edm`` are finite
    everywhere."""
    _check(prediction)
    t = jnp.asarray([t], jnp.float32)
    a = float(process.alpha(t)[0])
    if prediction in ("epsilon", "score") and a == 0.0:
        bad = "alpha = 0 there, so x0 = (x - sigma eps) / alpha is infinite"
    elif prediction == "velocity":
        da, ds = process.derivatives(t)
        if float(da[0] * process.sigma(t)[0] - a * ds[0]) != 0.0:
            return
        bad = "alpha = 0 on the whole interval, so the velocity carries no information about x0"
    else:
        return
    if getattr(process, "discrete", False):
        fix = "sample on a grid that starts below t_max (sample.grid='leading' starts at 900 of 1000 at 10 steps)"
    else:
        fix = "sample on a grid that starts where alpha > 0 (a process with t_max < 1)"
    raise ValueError(f"prediction {prediction!r} gives no x0 at t = {float(t[0]):g}{where}: {bad}. Either {fix}, "
                     "or train with v_prediction or sample, which are finite there")


def convert(out, x, t, process: Process, src: str, dst: str):
    """Convert a prediction of type ``src`` to type ``dst`` at (x, t)."""
    if src == dst:
        return out
    return from_x0(dst, to_x0(src, out, x, t, process), x, t, process)


def edm_precond(sigma, sigma_data: float = 0.5):
    """EDM preconditioning coefficients (Karras et al. 2022, Table 1, "Ours").

    Returns (c_skip, c_out, c_in, c_noise) for VE-frame noise level ``sigma``.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma**2 + sd2)
    c_in = 1.0 / jnp.sqrt(sigma**2 + sd2)
    c_noise = 0.25 * jnp.log(jnp.clip(sigma, 1e-30, 1e30))  # finite at sigma = 0 and inf
    return c_skip, c_out, c_in, c_noise


def edm_vp_coefficients(a, s, sigma_data: float):
    """EDM's coefficients for a VP-frame state x = alpha x0 + sigma eps, in forms that stay finite
    at sigma = 0 and at alpha = 0: ``(c_skip / alpha, c_out, c_in / alpha, c_noise)`` with
    VE-frame noise level sigma / alpha, i.e. ``sd^2 alpha / (sigma^2 + sd^2 alpha^2)``,
    ``sigma sd / sqrt(sigma^2 + sd^2 alpha^2)``, ``1 / sqrt(sigma^2 + sd^2 alpha^2)`` and
    ``log(sigma / alpha) / 4`` (clipped). At sigma = 0 D = x / alpha exactly (c_out = 0)."""
    sd2 = sigma_data**2
    den = s**2 + sd2 * a**2
    c_skip_a = sd2 * a / den
    c_out = s * sigma_data * jax.lax.rsqrt(den)
    c_in_a = jax.lax.rsqrt(den)
    ratio = jnp.where(a == 0, jnp.inf, s / jnp.where(a == 0, 1.0, a))
    c_noise = 0.25 * jnp.log(jnp.clip(ratio, 1e-30, 1e30))
    return c_skip_a, c_out, c_in_a, c_noise


def net_inputs(prediction: str, x, t, process: Process, sigma_data: float = 0.5):
    """What the network is fed at (x, t): ``(x_in, t_in)``, t_in of shape (batch,)."""
    batch = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    if prediction == "edm":
        _, _, c_in_a, c_noise = edm_vp_coefficients(process.alpha(t), process.sigma(t), sigma_data)
        return _bcast(c_in_a, x) * x, c_noise
    return x, process.net_time(t)


def make_denoiser(net: Callable, process: Process, prediction: str, sigma_data: float = 0.5) -> Denoiser:
    """Wrap ``net(x_in, t_in) -> output`` into ``denoise(x, t) -> x0_hat``.

    ``net`` is typically ``lambda x, t: model.apply(params, x, t, y)``; ``t`` passed to the
    denoiser is the process time (scalar or (batch,)).
    """
    _check(prediction)

    def denoise(x, t):
        x_in, t_in = net_inputs(prediction, x, t, process, sigma_data)
        return _output_to_x0(prediction, net(x_in, t_in).astype(x.dtype), x, t, process, sigma_data)

    return denoise


def make_denoiser_with_variance(net: Callable, process: Process, prediction: str, sigma_data: float = 0.5):
    """Wrap a network with ``2 C`` output channels (the prediction, then iDDPM's variance
    interpolation ``v``; DiT's learned sigma) into ``denoise(x, t) -> (x0_hat, v)``, the form
    ``samplers.ddpm(variance="learned_range")`` takes (:mod:`jaxdiff.variance`). One network call."""
    _check(prediction)

    def denoise(x, t):
        x_in, t_in = net_inputs(prediction, x, t, process, sigma_data)
        out = net(x_in, t_in).astype(x.dtype)
        c = x.shape[-1]
        if out.shape[-1] != 2 * c:
            raise ValueError(f"a learned-variance denoiser needs 2 x {c} output channels, the network has "
                             f"{out.shape[-1]}")
        return _output_to_x0(prediction, out[..., :c], x, t, process, sigma_data), out[..., c:]

    return denoise


def _output_to_x0(prediction, out, x, t, process, sigma_data):
    if prediction == "edm":
        tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        c_skip_a, c_out, _, _ = edm_vp_coefficients(process.alpha(tb), process.sigma(tb), sigma_data)
        return _bcast(c_skip_a, x) * x + _bcast(c_out, x) * out
    return to_x0(prediction, out, x, t, process)
