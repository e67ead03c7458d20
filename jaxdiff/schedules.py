"""Sampling time grids.

A :class:`Grid` is the list of points a sampler visits, from noise to data: times ``t`` and the
process coefficients ``alpha``, ``sigma`` at those times, ``N + 1`` points for ``N`` steps. The
last point may lie past the process's domain at ``sigma = 0, alpha = 1`` (the clean data),
which is where diffusers' ``final_sigmas_type="zero"`` / ``set_alpha_to_one=True`` and
k-diffusion's appended zero sigma end. The grid also carries its process (a static pytree field)
so that samplers needing intermediate times (Heun with churn, DPM-Solver-2 midpoints) can map a
noise level back to a time.

Grid builders:

* :func:`discrete_timesteps` -- diffusers' ``linspace`` / ``leading`` / ``trailing`` integer
  timesteps (Lin et al. 2024, Table 2).
* :func:`karras_sigmas` -- Karras et al. 2022, Eq. 5 (rho = 7).
* :func:`logsnr_uniform_times` -- uniform in log-SNR (DPM-Solver's ``logSNR`` skip type).
* :func:`uniform_times` -- uniform in t.
* :func:`beta_times` -- times at the quantiles of a Beta(a, b) distribution (Lee et al. 2024,
  "Beta Sampling is All You Need"), dense near both ends for a = b < 1; :func:`beta_ppf` is the
  Beta quantile function in float64 numpy (no scipy).
* :func:`grid_from_times`, :func:`grid_from_sigmas` -- turn times or VE-frame sigmas into a Grid.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.processes import Process

__all__ = [
    "Grid",
    "TIMESTEP_SPACINGS",
    "discrete_timesteps",
    "default_grid_kind",
    "karras_sigmas",
    "logsnr_uniform_times",
    "uniform_times",
    "beta_ppf",
    "beta_times",
    "grid_from_times",
    "grid_from_sigmas",
    "make_grid",
    "GRID_KINDS",
    "starts_at_alpha_zero",
    "require_alpha_start_positive",
]


@dataclasses.dataclass(frozen=True)
class Grid:
    """Points ``t[0] > t[1] > ... > t[N]`` with ``alpha``, ``sigma`` at each (float32 arrays)."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array
    process: Process

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0]) - 1

    @property
    def sigma_ratio(self):
        """sigma / alpha: the noise level in the variance-exploding frame (k-diffusion's sigma)."""
        return self.sigma / self.alpha

    def prior_sample(self, key, shape, dtype=jnp.float32):
        """x at the first grid point for pure-noise start: sigma[0] * N(0, I)."""
        return (self.sigma[0] * jax.random.normal(key, shape)).astype(dtype)


jax.tree_util.register_dataclass(Grid, data_fields=["t", "alpha", "sigma"], meta_fields=["process"])


TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def discrete_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0
) -> np.ndarray:
    """diffusers' integer timesteps, decreasing (``DDIMScheduler.set_timesteps`` and friends)."""
    n, k = int(num_train_timesteps), int(num_steps)
    if not 1 <= k <= n:
        raise ValueError(f"num_steps must be in [1, {n}], got {k}")
    if spacing == "linspace":
        ts = np.linspace(0, n - 1, k).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ratio = n // k
        ts = (np.arange(0, k) * ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        ratio = n / k
        ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")
    return ts


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, Eq. 5: sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.

    Returns ``num_steps`` decreasing sigmas (no trailing zero; :func:`grid_from_sigmas` adds it).
    """
    ramp = np.linspace(0, 1, int(num_steps))
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def uniform_times(process: Process, num_steps: int, t_end: float | None = None) -> np.ndarray:
    """``num_steps + 1`` times uniform in t from ``t_max`` to ``t_end`` (default ``t_min``)."""
    t_end = process.t_min if t_end is None else t_end
    return np.linspace(process.t_max, t_end, int(num_steps) + 1)


def logsnr_uniform_times(process: Process, num_steps: int, t_end: float | None = None) -> np.ndarray:
    """``num_steps + 1`` times uniform in log-SNR between ``t_max`` and ``t_end`` (Lu et al. 2022)."""
    t_end = process.t_min if t_end is None else t_end
    l0, l1 = float(process.logsnr(process.t_max)), float(process.logsnr(t_end))
    if not (np.isfinite(l0) and np.isfinite(l1)):
        raise ValueError(f"log-SNR is {l0}..{l1} at t_max..t_end: pick a t_end (and process range) where it is finite")
    return np.asarray(process.t_from_logsnr(jnp.linspace(l0, l1, int(num_steps) + 1)))


def _betainc(a: float, b: float, x: np.ndarray) -> np.ndarray:
    """Regularized incomplete beta function I_x(a, b) in float64 (Press et al., "Numerical
    Recipes", 3rd ed., Sec. 6.4: the continued fraction Eq. 6.4.5 by modified Lentz, on the side
    of (a + 1) / (a + b + 2) where it converges fast, with I_x(a, b) = 1 - I_{1-x}(b, a))."""
    x = np.clip(np.asarray(x, np.float64), 0.0, 1.0)

    def cf(a, b, x):
        tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
        c = np.ones_like(x)
        d = 1.0 - qab * x / qap
        d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
        h = d.copy()
        for m in range(1, 301):
            for aa in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                       -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
                d = 1.0 + aa * d
                d = 1.0 / np.where(np.abs(d) < tiny, tiny, d)
                c = 1.0 + aa / c
                c = np.where(np.abs(c) < tiny, tiny, c)
                h = h * d * c
            if np.all(np.abs(d * c - 1.0) < 1e-15):  # converged everywhere
                break
        return h

    with np.errstate(divide="ignore", invalid="ignore"):
        log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * np.log(x) + b * np.log1p(-x))
        front = np.exp(log_front)
        lower = x < (a + 1.0) / (a + b + 2.0)
        aa, bb = np.where(lower, a, b), np.where(lower, b, a)  # the fast side only
        frac = front * cf(aa, bb, np.where(lower, x, 1.0 - x)) / aa
        out = np.where(lower, frac, 1.0 - frac)
    return np.where(x <= 0.0, 0.0, np.where(x >= 1.0, 1.0, out))


def beta_ppf(q, a: float = 0.6, b: float = 0.6) -> np.ndarray:
    """Quantile function of the Beta(a, b) distribution at probabilities ``q`` (float64 numpy).

    Bisection on :func:`_betainc` (the CDF), 60 halvings: about 1e-16 absolute error in x. Equals
    ``scipy.stats.beta.ppf(q, a, b)`` to ~1e-12 (tested), without importing scipy.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"Beta(a, b) needs a > 0 and b > 0, got a={a}, b={b}")
    q = np.asarray(q, np.float64)
    if np.any((q < 0) | (q > 1)):
        raise ValueError(f"beta_ppf: probabilities must lie in [0, 1], got {q}")
    lo, hi = np.zeros_like(q), np.ones_like(q)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        below = _betainc(a, b, mid) < q
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    x = 0.5 * (lo + hi)
    return np.where(q <= 0.0, 0.0, np.where(q >= 1.0, 1.0, x))


def beta_times(process: Process, num_steps: int, a: float = 0.6, b: float = 0.6,
               t_end: float | None = None) -> np.ndarray:
    """``num_steps + 1`` times from ``t_max`` to ``t_end`` (default ``t_min``) at the Beta(a, b)
    quantiles ``t_i = t_end + ppf(1 - i / num_steps) (t_max - t_end)`` (Lee et al. 2024, "Beta
    Sampling is All You Need", arXiv:2407.12173: time steps at the quantiles of Beta(a, b);
    a = b = 0.6, diffusers' default, packs steps near both ends of the trajectory).
    """
    t_end = process.t_min if t_end is None else t_end
    q = beta_ppf(1.0 - np.linspace(0.0, 1.0, int(num_steps) + 1), a, b)
    return t_end + q * (process.t_max - t_end)


def _append_zero(t, alpha, sigma, who: str):
    try:
        last = float(sigma[-1])
    except jax.errors.ConcretizationTypeError:  # a grid built under jit: its values are unknown
        last = None
    if last == 0.0:
        raise ValueError(
            f"{who}: the last point is already clean (sigma = 0 at t = {float(t[-1]):g}); "
            "final='zero' would append a second one and the samplers would evaluate the model at "
            "sigma = 0. Pass final='last' (N points -> N - 1 steps).")
    return (
        jnp.concatenate([t, jnp.zeros((1,), t.dtype)]),
        jnp.concatenate([alpha, jnp.ones((1,), alpha.dtype)]),
        jnp.concatenate([sigma, jnp.zeros((1,), sigma.dtype)]),
    )


def grid_from_times(process: Process, times, final: str = "zero") -> Grid:
    """A Grid visiting ``times`` (decreasing).

    ``final="zero"`` appends the clean point (alpha 1, sigma 0) after the last time, so ``N``
    times give ``N`` steps; ``final="last"`` ends at the last time (``N - 1`` steps), as times
    that already end at a clean point (e.g. ``linspace(1, 0, N)`` of rectified flow) need:
    ``"zero"`` raises there.
    """
    t = jnp.asarray(np.asarray(times, np.float64), jnp.float32)
    alpha, sigma = process.alpha(t), process.sigma(t)
    if final == "zero":
        t, alpha, sigma = _append_zero(t, alpha, sigma, "grid_from_times")
    elif final != "last":
        raise ValueError(f"final must be 'zero' or 'last', got {final!r}")
    return Grid(t=t, alpha=alpha.astype(jnp.float32), sigma=sigma.astype(jnp.float32), process=process)


def grid_from_sigmas(process: Process, sigmas, final: str = "zero") -> Grid:
    """A Grid at the VE-frame noise levels ``sigmas`` = sigma/alpha (decreasing), e.g. Karras sigmas."""
    s = jnp.asarray(np.asarray(sigmas, np.float64), jnp.float32)
    t = process.t_from_sigma_ratio(s)
    # alpha, sigma from the requested ratio itself (exact), not from the rounded time.
    alpha = 1.0 / jnp.sqrt(1.0 + s**2) if _is_vp(process) else process.alpha(t)
    sigma = s * alpha
    if final == "zero":
        t, alpha, sigma = _append_zero(t, alpha, sigma, "grid_from_sigmas")
    elif final != "last":
        raise ValueError(f"final must be 'zero' or 'last', got {final!r}")
    return Grid(t=t, alpha=alpha, sigma=sigma, process=process)


def _is_vp(process: Process) -> bool:
    from jaxdiff.processes import DiscreteVP, VPCosine, VPLinear

    return isinstance(process, (DiscreteVP, VPLinear, VPCosine))


GRID_KINDS = ("linspace", "leading", "trailing", "karras", "uniform", "logsnr", "beta", "beta_sigmas")


def default_grid_kind(process: Process, num_steps: int) -> str:
    """The grid kind :func:`make_grid` uses when none is given: ``linspace`` for a discrete process
    (diffusers' default), ``trailing`` for one step of it, ``karras`` for a process with a sigma
    range (EDM, VE), else ``uniform``."""
    # one step of linspace is [0], a start at the least noisy training step (sigma ~ 0.01 for
    # DDPM's betas), so one step starts at t_max
    if process.discrete:
        return "trailing" if int(num_steps) == 1 else "linspace"
    return "karras" if _has_sigma_range(process) else "uniform"


def make_grid(process: Process, num_steps: int, kind: str | None = None, *, rho: float = 7.0,
              sigma_min: float | None = None, sigma_max: float | None = None,
              beta_a: float = 0.6, beta_b: float = 0.6) -> Grid:
    """The usual grid for a process: ``num_steps`` model evaluations ending at clean data.

    Defaults: discrete VP -> diffusers ``linspace`` timesteps (``trailing`` for one step, which
    ``linspace`` would start at t = 0); EDM (and VE, any process with a
    ``sigma_min`` / ``sigma_max`` range) -> Karras rho = 7; others -> uniform in t ending at
    ``t_min``. ``karras`` and ``logsnr`` space the noise level sigma / alpha between
    ``sigma_max`` and ``sigma_min`` (default: its values at ``t_max`` and ``t_min``, which must
    be finite and positive -- pass the range for a process whose ends are clean or pure noise).

    ``beta`` (Lee et al. 2024): model evaluations at the times of :func:`beta_times` (Beta(beta_a,
    beta_b) quantiles between ``t_max`` and ``t_min``; float times also for discrete processes).
    ``beta_sigmas``: diffusers' ``use_beta_sigmas`` -- the noise level sigma / alpha (not t) at
    ``sigma_min + ppf(1 - i / (N - 1)) (sigma_max - sigma_min)``, range as for ``karras``.

    Zero terminal SNR (Lin et al. 2024): ``processes.discrete_vp(..., rescale_betas_zero_snr=True)``
    with ``trailing`` (or ``linspace``, ``beta``, ``uniform``) starts at t = 999 where alpha = 0;
    :class:`~jaxdiff.processes.RectifiedFlow` grids that start at t = 1 do too. Every sampler steps
    from alpha = 0 except those that call :func:`require_alpha_start_positive` (``pndm``, ``plms``,
    ``reverse_sde_pc``), which raise a ValueError saying so.
    """
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"make_grid: num_steps must be a positive integer (model evaluations), got {num_steps!r}")
    kind = kind or default_grid_kind(process, num_steps)
    if kind in TIMESTEP_SPACINGS:
        if not process.discrete:
            raise ValueError(f"grid kind {kind!r} needs a discrete process, got {type(process).__name__}")
        return grid_from_times(process, discrete_timesteps(process.num_train_timesteps, num_steps, kind))
    if kind in ("karras", "logsnr", "beta_sigmas"):
        smin = sigma_min if sigma_min is not None else float(process.sigma_ratio(process.t_min))
        smax = sigma_max if sigma_max is not None else float(process.sigma_ratio(process.t_max))
        if not 0.0 < smin < smax < float("inf"):
            raise ValueError(
                f"grid kind {kind!r} needs 0 < sigma_min < sigma_max < inf in sigma/alpha; "
                f"{type(process).__name__} gives {smin}..{smax} at t_min..t_max: pass sigma_min= and sigma_max="
            )
        if kind == "karras":
            sigmas = karras_sigmas(num_steps, smin, smax, rho)
        elif kind == "beta_sigmas":  # diffusers' _convert_to_beta (use_beta_sigmas=True)
            sigmas = smin + beta_ppf(1.0 - np.linspace(0.0, 1.0, int(num_steps)), beta_a, beta_b) * (smax - smin)
        else:  # uniform in log-SNR = -2 log(sigma / alpha) (DPM-Solver's "logSNR" skip type)
            sigmas = np.geomspace(smax, smin, int(num_steps))
        return grid_from_sigmas(process, sigmas)
    if kind == "uniform":
        # Evaluate the model at N times ending at t_min, then step to clean data; if t_min is
        # already clean (flows: sigma(t_min) = 0), use N + 1 points and drop the last.
        clean_end = float(process.sigma(process.t_min)) == 0.0
        n = num_steps + 1 if clean_end else num_steps
        times = uniform_times(process, n - 1)
        return grid_from_times(process, times[:-1] if clean_end else times)
    if kind == "beta":
        clean_end = float(process.sigma(process.t_min)) == 0.0  # as for "uniform"
        n = num_steps + 1 if clean_end else num_steps
        times = beta_times(process, n - 1, beta_a, beta_b)
        return grid_from_times(process, times[:-1] if clean_end else times)
    raise ValueError(f"unknown grid kind {kind!r}; valid: {', '.join(GRID_KINDS)}")


def _has_sigma_range(process: Process) -> bool:
    return hasattr(process, "sigma_max") and hasattr(process, "sigma_min")


def starts_at_alpha_zero(grid: Grid) -> bool:
    """Whether ``grid`` starts at alpha = 0 (zero terminal SNR, a flow at t = 1). False when the grid
    is itself traced (a ``jit`` argument: its values are unknown); a concrete grid closed over by a
    jitted function is read (indexing it inside the trace would give a tracer, so it is read as a
    NumPy array)."""
    alpha = grid.alpha
    if isinstance(alpha, jax.core.Tracer):
        return False
    return float(np.asarray(alpha).reshape(-1)[0]) == 0.0


def require_alpha_start_positive(name: str, grid: Grid, why: str) -> None:
    """Raise a ValueError if a sampler that cannot step from alpha = 0 gets a grid starting there.

    Concrete grids are checked, also when a jitted function closes over one; a grid passed as a
    ``jit`` argument (traced) is not, and one starting at alpha = 0 gives NaN for these samplers.
    """
    if starts_at_alpha_zero(grid):
        raise ValueError(
            f"{name}: the grid starts at alpha = 0 (zero terminal SNR, or a flow at t = 1), where {why}. "
            "Start the grid just below that point (e.g. drop its first time), or use a sampler that steps "
            "from alpha = 0: every registered sampler except pndm, plms and reverse_sde_pc (e.g. euler, "
            "heun, ddim, dpmpp_2m, unipc, flow_euler, flow_heun, pf_ode_adaptive, consistency_multistep)."
        )
