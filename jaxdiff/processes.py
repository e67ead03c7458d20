"""Forward processes in one coordinate system: ``x_t = alpha(t) * x0 + sigma(t) * eps``.

Every process exposes ``alpha(t)``, ``sigma(t)``, ``logsnr(t) = log(alpha^2 / sigma^2)`` and the
inverse ``t_from_logsnr``, so samplers can move between time, noise level and log-SNR without
knowing which process they run on. Processes are immutable Python objects (static under ``jit``)
whose methods are pure ``jax.numpy`` functions of ``t``.

Processes here:

* :class:`DiscreteVP` -- DDPM's discrete variance-preserving chain with diffusers' beta schedules
  (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``) and optional zero-terminal-SNR rescaling
  (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1).
  Time is the integer timestep ``0 .. N-1``; between integers the log-SNR is interpolated
  linearly, as k-diffusion's ``DiscreteSchedule`` and diffusers' ``_sigma_to_t`` do.
* :class:`VPLinear` -- continuous VP SDE with linear beta(t) (Song et al. 2021, Eq. 32-33).
* :class:`VPCosine` -- the cosine schedule (Nichol & Dhariwal 2021, Eq. 17) in continuous time.
* :class:`VE` -- variance-exploding SDE, sigma(t) = sigma_min (sigma_max/sigma_min)^t
  (Song et al. 2021, Eq. 30).
* :class:`EDM` -- Karras et al. 2022: alpha = 1, sigma(t) = t.
* :class:`RectifiedFlow` -- the linear interpolant alpha = 1 - t, sigma = t (Liu et al. 2023;
  Lipman et al. 2023 with sigma_min = 0).

All returned arrays are float32, whatever the inputs' dtype (times are cast to float32 first; with
``jax_enable_x64`` on as well). The samplers likewise carry their state in float32 and return
it in the input's dtype: a float64 state is computed in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Process",
    "DiscreteVP",
    "VPLinear",
    "VPCosine",
    "VE",
    "EDM",
    "RectifiedFlow",
    "discrete_vp",
    "make_betas",
    "rescale_zero_terminal_snr",
    "BETA_SCHEDULES",
    "make_process",
]


class Process:
    """Base class of a forward process ``x_t = alpha(t) x0 + sigma(t) eps``.

    Subclasses implement :meth:`alpha`, :meth:`sigma` and :meth:`t_from_logsnr` and set
    ``t_min`` / ``t_max``, the time interval a sampler runs over (``t_max`` is pure-ish noise).
    """

    t_min: float
    t_max: float
    discrete: bool = False
    ode_frame: str = "sigma_ratio"  # the frame Heun-type solvers integrate in ("time" for flows)

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def logsnr(self, t):
        """log(alpha(t)^2 / sigma(t)^2)."""
        return 2.0 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def sigma_ratio(self, t):
        """The noise level in the variance-exploding frame, sigma(t) / alpha(t) (k-diffusion's sigma)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_logsnr(self, logsnr):
        raise NotImplementedError

    def t_from_sigma_ratio(self, sigma_ratio):
        """Inverse of :meth:`sigma_ratio`."""
        return self.t_from_logsnr(-2.0 * jnp.log(sigma_ratio))

    def alpha_sigma(self, t):
        return self.alpha(t), self.sigma(t)

    def derivatives(self, t):
        """(d alpha/dt, d sigma/dt) at t, by forward-mode autodiff (used for velocity outputs)."""
        t = jnp.asarray(t, jnp.float32)
        _, da = jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))
        _, ds = jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))
        return da, ds

    def net_time(self, t):
        """The scalar a network is conditioned on at time t (default: 1000 t, as Song et al.)."""
        return 1000.0 * jnp.asarray(t, jnp.float32)

    def sample_t(self, key, shape):
        """Uniform training times on [t_min, t_max] (integers for discrete processes)."""
        return jax.random.uniform(key, shape, minval=self.t_min, maxval=self.t_max)

    def marginal(self, x0, t, eps):
        """x_t for given x0, t (broadcast over x0's trailing axes) and noise."""
        a, s = self.alpha(t), self.sigma(t)
        shape = (-1,) + (1,) * (x0.ndim - 1)
        return jnp.reshape(a, shape) * x0 + jnp.reshape(s, shape) * eps


# --------------------------------------------------------------------------------------------
# Discrete VP (DDPM) with diffusers' beta schedules.
# --------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def make_betas(
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
) -> np.ndarray:
    """Betas exactly as diffusers builds them (float64 here, float32 in diffusers).

    ``linear``: Ho et al. 2020; ``scaled_linear``: linear in sqrt(beta) (Stable Diffusion);
    ``squaredcos_cap_v2``: Nichol & Dhariwal 2021 Eq. 17 with s = 0.008, betas capped at 0.999.
    """
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":

        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")
    return betas


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has zero SNR (Lin et al. 2024, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
    a0, a_last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - a_last) * a0 / (a0 - a_last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclasses.dataclass(frozen=True)
class DiscreteVP(Process):
    """DDPM's discrete VP chain: alpha_t^2 = prod_{s<=t} (1 - beta_s), sigma_t^2 = 1 - alpha_t^2.

    Time is the diffusers timestep (0 .. N-1, float). Between integers the log-SNR is linear in t.
    Build with :func:`discrete_vp`.
    """

    alphas_cumprod: tuple  # tuple of floats (hashable, static under jit)
    name: str = "discrete_vp"

    discrete = True

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def t_min(self) -> float:
        return 0.0

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    def _logsnr_table(self):
        return _logsnr_table(self.alphas_cumprod)

    def logsnr(self, t):
        return _interp_table(self._logsnr_table().astype(np.float32), jnp.asarray(t, jnp.float32))

    def alpha(self, t):
        # alpha^2 = sigmoid(logsnr): exact at integers, finite at logsnr = -inf.
        return jnp.sqrt(jax.nn.sigmoid(self.logsnr(t)))

    def sigma(self, t):
        return jnp.sqrt(jax.nn.sigmoid(-self.logsnr(t)))

    def t_from_logsnr(self, logsnr):
        table = self._logsnr_table()
        finite = np.isfinite(table)
        xs = jnp.asarray(table[finite][::-1], jnp.float32)  # increasing logsnr
        ts = jnp.asarray(np.arange(len(table))[finite][::-1], jnp.float32)
        logsnr = jnp.asarray(logsnr, jnp.float32)
        t = jnp.interp(logsnr, xs, ts)
        if not finite[-1]:  # zero-terminal SNR: log-SNR -inf is t_max (alpha = 0), not the last finite entry
            t = jnp.where(logsnr == -jnp.inf, self.t_max, t)
        return t

    def derivatives(self, t):
        """(d alpha/dt, d sigma/dt) of the interpolated chain (for velocity outputs).

        The log-SNR is piecewise linear in t, so its slope jumps at the integers, where autodiff
        of :meth:`logsnr` would give 0. Use the slope of the interval below, (ceil(t) - 1, ceil(t))
        -- the one a sampler steps through from t -- and (0, 1) at t = 0; with
        d alpha/dlogsnr = alpha sigma^2 / 2 and d sigma/dlogsnr = -sigma alpha^2 / 2.
        """
        with np.errstate(invalid="ignore"):
            slopes = np.diff(self._logsnr_table())  # float64: differences of O(10) values
        slopes = jnp.asarray(np.where(np.isfinite(slopes), slopes, 0.0), jnp.float32)  # 0 where alpha = 0
        t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, self.t_max)
        slope = slopes[jnp.clip(jnp.ceil(t).astype(jnp.int32), 1, self.num_train_timesteps - 1) - 1]
        a, s = self.alpha(t), self.sigma(t)
        return 0.5 * a * s**2 * slope, -0.5 * s * a**2 * slope

    def net_time(self, t):
        return jnp.asarray(t, jnp.float32)

    def sample_t(self, key, shape):
        return jax.random.randint(key, shape, 0, self.num_train_timesteps).astype(jnp.float32)


@functools.lru_cache(maxsize=64)
def _logsnr_table(alphas_cumprod: tuple) -> np.ndarray:
    """log(alpha_bar / (1 - alpha_bar)) in float64 (cached: DiscreteVP methods are called often)."""
    ac = np.asarray(alphas_cumprod, np.float64)
    with np.errstate(divide="ignore"):
        table = np.log(ac) - np.log1p(-ac)
    table.setflags(write=False)
    return table


@jax.jit
def _interp_table(table, t):
    """Linear interpolation of ``table`` at float times t, clipped to [0, len - 1]; jitted so that
    eager calls are one dispatch instead of a dozen indexing ops."""
    n = table.shape[0]
    t = jnp.clip(t, 0.0, n - 1.0)
    lo = jnp.floor(t).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, n - 1)
    w = t - lo.astype(jnp.float32)
    a, b = table[lo], table[hi]
    # Exact at integers (avoids 0 * -inf when the last entry is zero-terminal SNR).
    return jnp.where(w == 0, a, jnp.where(w == 1, b, a + w * (b - a)))


def discrete_vp(
    beta_schedule: str = "linear",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    rescale_betas_zero_snr: bool = False,
    trained_betas: Sequence[float] | None = None,
) -> DiscreteVP:
    """A :class:`DiscreteVP` from diffusers' scheduler arguments (same names and defaults)."""
    betas = (
        np.asarray(trained_betas, np.float64)
        if trained_betas is not None
        else make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
    )
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    # diffusers holds betas in float32 and accumulates them in float32. Round the betas the same
    # way but accumulate in float64: a float32 cumprod here adds its own rounding to diffusers'
    # (up to 1.4e-6 apart for squaredcos_cap_v2 + zero SNR); float64 stays within diffusers' own
    # float32 rounding (< 1e-6) of it.
    ac = np.cumprod(1.0 - betas.astype(np.float32).astype(np.float64))
    return DiscreteVP(alphas_cumprod=tuple(float(a) for a in ac), name=f"discrete_vp_{beta_schedule}")


# --------------------------------------------------------------------------------------------
# Continuous processes.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VPLinear(Process):
    """Continuous VP SDE with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021).

    log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0

    def _log_alpha(self, t):
        t = jnp.asarray(t, jnp.float32)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t):
        return jnp.exp(self._log_alpha(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(2.0 * self._log_alpha(t)))

    def logsnr(self, t):
        la2 = 2.0 * self._log_alpha(t)
        return la2 - jnp.log(-jnp.expm1(la2))

    def t_from_logsnr(self, logsnr):
        # log alpha^2 = -softplus(-logsnr) = -(b t^2/2 + beta_min t), b = beta_max - beta_min.
        c = jax.nn.softplus(-jnp.asarray(logsnr, jnp.float32))
        b = self.beta_max - self.beta_min
        return 2.0 * c / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * b * c))


@dataclasses.dataclass(frozen=True)
class VPCosine(Process):
    """Cosine VP schedule, alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2) (Nichol & Dhariwal 2021).

    ``t_max`` stops short of 1 where alpha would vanish.
    """

    s: float = 0.008
    t_min: float = 0.0
    t_max: float = 0.9946

    def _phi(self, t):
        return (jnp.asarray(t, jnp.float32) + self.s) / (1.0 + self.s) * (jnp.pi / 2)

    def alpha(self, t):
        return jnp.cos(self._phi(t)) / math.cos(self.s / (1 + self.s) * math.pi / 2)

    def sigma(self, t):
        # sigma^2 = 1 - cos^2(phi) / cos^2(phi0) = sin(d) sin(d + 2 phi0) / cos^2(phi0), d = phi - phi0
        # computed from t: no cancellation near t = 0, where 1 - alpha^2 rounds to 0 in float32
        # (sigma(1e-6) = 2.0e-4, not 0; relative error ~1e-7 instead of 4e-2 at t = 1e-5).
        phi0 = self.s / (1.0 + self.s) * math.pi / 2
        d = jnp.asarray(t, jnp.float32) / (1.0 + self.s) * (jnp.pi / 2)
        s2 = jnp.sin(d) * jnp.sin(d + 2.0 * phi0) / math.cos(phi0) ** 2
        return jnp.sqrt(jnp.clip(s2, 0.0, 1.0))

    def t_from_logsnr(self, logsnr):
        # Solve sin(d) sin(d + 2 phi0) = c := sigma^2 cos^2(phi0), sigma^2 = sigmoid(-logsnr), for
        # tan(d): x^2 (cos 2phi0 - c) + x sin 2phi0 - c = 0, root x = 2c / (sin 2phi0 + sqrt(D)) with the
        # discriminant D = 4 cos^2(phi0) alpha^2 (sin^2(phi0) + c) written as a product (no cancellation
        # near t = 0, where c -> 0, nor near t = 1, where alpha -> 0 and D -> 0).
        phi0 = self.s / (1.0 + self.s) * math.pi / 2
        logsnr = jnp.asarray(logsnr, jnp.float32)
        c = jax.nn.sigmoid(-logsnr) * math.cos(phi0) ** 2
        alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))
        sqrt_d = 2.0 * math.cos(phi0) * alpha * jnp.sqrt(math.sin(phi0) ** 2 + c)
        x = 2.0 * c / (math.sin(2 * phi0) + sqrt_d)
        return jnp.arctan(x) * 2.0 / jnp.pi * (1.0 + self.s)


@dataclasses.dataclass(frozen=True)
class VE(Process):
    """Variance exploding: alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t (Song et al. 2021)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 0.0
    t_max: float = 1.0

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        t = jnp.asarray(t, jnp.float32)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t_from_logsnr(self, logsnr):
        log_sigma = -0.5 * jnp.asarray(logsnr, jnp.float32)
        return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class EDM(Process):
    """Karras et al. 2022 (EDM): alpha = 1, sigma(t) = t, on [sigma_min, sigma_max]."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    @property
    def t_min(self) -> float:
        return self.sigma_min

    @property
    def t_max(self) -> float:
        return self.sigma_max

    def alpha(self, t):
        return jnp.ones_like(jnp.asarray(t, jnp.float32))

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def t_from_logsnr(self, logsnr):
        return jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))

    def net_time(self, t):
        # EDM's c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1).
        return 0.25 * jnp.log(jnp.asarray(t, jnp.float32))

    def sample_t(self, key, shape):
        """EDM's log-normal training density, ln sigma ~ N(-1.2, 1.2^2) (Table 1)."""
        return jnp.exp(-1.2 + 1.2 * jax.random.normal(key, shape))


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Process):
    """Linear interpolant x_t = (1 - t) x0 + t eps (rectified flow / flow matching)."""

    t_min: float = 0.0
    t_max: float = 1.0
    ode_frame = "time"

    def alpha(self, t):
        return 1.0 - jnp.asarray(t, jnp.float32)

    def sigma(self, t):
        return jnp.asarray(t, jnp.float32)

    def logsnr(self, t):
        t = jnp.asarray(t, jnp.float32)
        return 2.0 * (jnp.log1p(-t) - jnp.log(t))

    def t_from_logsnr(self, logsnr):
        return jax.nn.sigmoid(-0.5 * jnp.asarray(logsnr, jnp.float32))


PROCESSES = {
    "discrete_vp": discrete_vp,
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "ve": VE,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}


def make_process(cfg) -> Process:
    """Build a process from a mapping with ``name`` and constructor kwargs."""
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    name = cfg.pop("name")
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; valid: {', '.join(sorted(PROCESSES))}")
    return PROCESSES[name](**cfg)
