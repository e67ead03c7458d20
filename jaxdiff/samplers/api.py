"""The diffusers-convention entry point: ``sample(name, model_fn, x_T, schedule, num_steps, ...)``.

A user who has a diffusers pipeline -- a model trained on a discrete VP schedule
(``DDPMScheduler``-style ``beta_schedule`` / ``beta_start`` / ``beta_end``), a network called as
``model(x, timestep)`` that returns eps, v or x0, and a scheduler config -- gets the same samples
from jaxdiff by naming the sampler:

    x0 = sample("dpmpp_2m", model_fn, x_T, {"beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012}, 25, key=key,
                prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)

What ``sample`` does, all of it what diffusers' scheduler does in ``set_timesteps``:

1. the discrete VP process from the schedule (:func:`jaxdiff.processes.discrete_vp`);
2. the points a diffusers scheduler visits for ``num_steps`` steps, by the scheduler class that
   corresponds to the sampler (table below): its integer or float timesteps for the spacing
   ("linspace" / "leading" / "trailing", Lin et al. 2024, Table 2; the classes differ -- e.g.
   ``DPMSolverMultistepScheduler`` spaces N + 1 points and drops the last), its sigmas (linear
   interpolation of the VE noise level sigma / alpha in t between training steps for the
   sigma-space schedulers; the training steps' sigmas from diffusers' float32 ``alphas_cumprod``,
   as diffusers has them, see ``_diffusers_sigma_table``), Karras sigmas with ``use_karras_sigmas=True`` (Karras et al. 2022,
   Eq. 5, rho = 7, between the table's end sigmas) and the final point (``final_sigmas_type``,
   ``set_alpha_to_one``);
3. the one denoiser interface, ``parameterization.make_denoiser(model, process, prediction_type)``;
   the network is told diffusers' timestep for each grid point (the float timestep of a
   sigma-space scheduler, the rounded one of a multistep scheduler with Karras sigmas) while the
   solver uses the exact grid coefficients -- both as in diffusers;
4. diffusers' initial-noise scaling: ``x_T`` is unit Gaussian noise (a pipeline's ``latents``
   before ``* scheduler.init_noise_sigma``); sigma-space schedulers start their VE-frame state at
   ``x_T * init_noise_sigma`` (sigma_max for "linspace" / "trailing", sqrt(sigma_max^2 + 1) for
   "leading"), which is ``alpha_0 * init_noise_sigma * x_T`` in jaxdiff's frame (diffusers'
   ``scale_model_input`` divides by sqrt(sigma^2 + 1), giving the network that same state);
5. the registered sampler, ``samplers.get(name)(denoise, x, grid, key=key, **options)``, and
   returns the final state (the sample at sigma = 0, or at the final point of the scheduler).

Sampler -> diffusers scheduler whose conventions are used:

=====================  =======================================================================
``ddpm``, ``ddim``     ``DDPMScheduler``, ``DDIMScheduler`` (N timesteps; final alpha_bar 1, or
                       alphas_cumprod[0] with ``set_alpha_to_one=False``; ``clip_sample=True``
                       by default, as diffusers)
``pndm``, ``plms``     ``PNDMScheduler`` (with / without PRK steps; ``set_alpha_to_one`` default
                       False as diffusers; a v-prediction model's raw outputs are combined,
                       ``combine="v"``, as diffusers does)
``dpmpp_2m``           ``DPMSolverMultistepScheduler`` (``dpmsolver++``, order 2)
``unipc``, ``deis``    ``UniPCMultistepScheduler``, ``DEISMultistepScheduler`` (DEIS ends at
                       sigma_min, as diffusers always does)
``dpm_solver``         ``DPMSolverSinglestepScheduler`` (its timesteps ignore
                       ``timestep_spacing``, as diffusers' do; ``lower_order_final=True`` default)
every other name       ``EulerDiscreteScheduler`` / ``HeunDiscreteScheduler`` /
                       ``LMSDiscreteScheduler`` / ``KDPM2DiscreteScheduler`` (all share these
                       sigma-space conventions): the k-diffusion / EDM family
=====================  =======================================================================

Where diffusers' own loop is no sampler on any grid, jaxdiff runs the consistent grid and the
results differ (see tests/samplers/test_vs_diffusers.py): ``DDIMScheduler`` / ``PNDMScheduler``
with "linspace" spacing (and "trailing" when N does not divide ``num_train_timesteps``) step from
t to t - T // N, which is not their next timestep. For ``dpm2`` / ``dpm2_ancestral`` at "linspace"
spacing without Karras sigmas, the midpoint's model timestep is interpolated between the two grid
points' timesteps (diffusers takes log-sigma interpolation there: a fraction of a timestep apart).
Refused with a ValueError that says what to do instead: zero-terminal-SNR schedules outside
DDPM / DDIM / PNDM (diffusers' sigma-space and multistep classes replace alphas_cumprod[-1] by
2**-24 there), ``dpmpp_2m`` into ``final_sigmas_type="sigma_min"`` with fewer than 15 steps
(diffusers' ``lower_order_final`` then takes a first-order last step), and config options that
change the result but are not implemented (``thresholding``, exponential / beta / Lu sigmas, ...).

Flow matching (``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``, SD3's
``shift``) has no discrete VP schedule: :func:`flow_match_grid` gives its grid on
:class:`~jaxdiff.processes.RectifiedFlow` for ``euler`` / ``heun`` / ``flow_euler`` / ``flow_heun``
with ``make_denoiser(net, RectifiedFlow(), "velocity")`` (tests/samplers/test_vs_diffusers_flow_edm.py).

jit. ``name``, ``schedule``, ``num_steps``, ``prediction_type``, ``timestep_spacing`` and every
scheduler / sampler option are static (Python values: the grid is built in NumPy at trace time);
``x_T`` and ``key`` are traced, and so is whatever ``model_fn`` closes over, e.g.

    f = jax.jit(lambda params, x, key, w: sample("euler", lambda x, t: cfg(params, x, t, w),
                                                 x, schedule, 30, key=key))

compiles once per step count and reuses the executable for every guidance scale ``w``. (On CPU,
``jaxdiff.compile_options.jit`` in place of ``jax.jit`` runs the network's convolutions on XLA's
own kernels; see that module.)
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiff.parameterization as PZ
import jaxdiff.processes as P
import jaxdiff.schedules as S

__all__ = ["sample", "scheduler_grid", "flow_match_grid", "shift_times", "SchedulerGrid", "PREDICTION_TYPES",
           "SCHEDULER_OF"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# sampler name -> the diffusers scheduler family whose set_timesteps conventions are used
SCHEDULER_OF = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "dpm_solver": "DPMSolverSinglestepScheduler",
}
_SIGMA_SCHEDULER = "EulerDiscreteScheduler"  # every other name

_PROCESS_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "rescale_betas_zero_snr",
                 "trained_betas")
# diffusers config keys that change the result and that sample() does not implement: refused when
# set to anything but diffusers' default, so a config is never silently half-applied.
_UNSUPPORTED_DEFAULTS = {
    "thresholding": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
    "use_lu_lambdas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
    "interpolation_type": "linear", "timestep_type": "discrete",
    "euler_at_final": False, "lambda_min_clipped": -float("inf"), "sigma_min": None, "sigma_max": None,
    "predict_x0": True, "solver_p": None,  # UniPCMultistepScheduler
}


class SchedulerGrid(NamedTuple):
    """The points a diffusers scheduler visits, in jaxdiff's terms.

    ``grid``: the :class:`~jaxdiff.schedules.Grid` (process times consistent with the grid's
    alpha, sigma); ``timesteps``: the timestep diffusers feeds the network at each of the first N
    points (float64); ``init_noise_sigma``: diffusers' ``scheduler.init_noise_sigma``;
    ``scheduler``: the diffusers class whose conventions were used.
    """

    grid: S.Grid
    timesteps: np.ndarray
    init_noise_sigma: float
    scheduler: str


def _process_and_config(schedule):
    """(DiscreteVP, the scheduler keys found in a diffusers config mapping)."""
    if isinstance(schedule, P.DiscreteVP):
        return schedule, {}
    if isinstance(schedule, str):
        return P.discrete_vp(schedule), {}
    if isinstance(schedule, Mapping):
        cfg = {k: v for k, v in dict(schedule).items() if not str(k).startswith("_")}
        for k, default in _UNSUPPORTED_DEFAULTS.items():
            if k in cfg and cfg[k] != default and cfg[k] is not None:
                raise ValueError(f"sample: scheduler config {k}={cfg[k]!r} is not supported (only diffusers' default "
                                 f"{default!r}); build a Grid yourself and call the sampler directly")
        proc_kw = {k: cfg[k] for k in _PROCESS_KEYS if k in cfg}
        return P.discrete_vp(**proc_kw), cfg
    raise TypeError("sample: schedule must be a jaxdiff.processes.DiscreteVP, a diffusers beta_schedule name "
                    f"({', '.join(P.BETA_SCHEDULES)}) or a mapping of diffusers scheduler-config keys, "
                    f"got {type(schedule).__name__}")


def _diffusers_sigma_table(ac):
    """The VE-frame sigmas sqrt((1 - alpha_bar) / alpha_bar) of the training steps the way the
    sigma-space and multistep schedulers compute them in ``set_timesteps``: from diffusers' float32
    ``alphas_cumprod`` (float32 ``1 - beta``, accumulated in float64 by torch's cumprod, rounded to
    float32) in float32 arithmetic. Near t = 0 this differs from the float64 table by far more than
    float32 rounding -- 1 - alpha_bar ~ 1e-4 keeps only ~3 digits once alpha_bar is a float32 -- e.g.
    8.3e-5 relative at t = 0 for "linear": sigma_min of the Karras sigmas, every Karras sigma
    between, and the sigma at t = 0 with "linspace" / "leading" spacing move with it. Within 3.1e-7
    of diffusers' table for the three beta schedules (its float32 betas come from torch.linspace,
    which differs from the float64 linspace by an ulp here and there).

    ``ac``: the process's float64 alphas_cumprod, the float64 cumprod of float32 betas; the betas
    are recovered exactly (they are float32 numbers ~1e-4 or more; the quotient is exact to 1e-16)."""
    ac = np.asarray(ac, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.concatenate([ac[:1], ac[1:] / ac[:-1]])
        betas = (1.0 - alphas).astype(np.float32)
        ac32 = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
        return np.sqrt((np.float32(1.0) - ac32) / ac32)  # float32, like diffusers'


def _sigma_to_t(sigmas, log_sigmas):
    """diffusers' ``_sigma_to_t``: linear interpolation of the timestep in log sigma."""
    log_s = np.log(np.maximum(np.asarray(sigmas, np.float64), 1e-10))
    return np.interp(log_s, log_sigmas, np.arange(len(log_sigmas), dtype=np.float64))


def _spaced(n_train, n, spacing, offset, plus_one, last=None):
    """Timesteps (decreasing) for ``spacing``; ``plus_one``: the multistep classes' N + 1 points
    with the last dropped (DPMSolverMultistep / UniPC / DEIS)."""
    last = n_train if last is None else last
    if spacing == "linspace":
        if plus_one:
            return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.float64)
        return np.linspace(0, n_train - 1, n).round()[::-1].astype(np.float64)
    if spacing == "leading":
        if plus_one:
            ratio = last // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.float64) + offset
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.float64) + offset
    if spacing == "trailing":
        return np.round(np.arange(last, 0, -n_train / n)).astype(np.float64) - 1
    raise ValueError(f"sample: unknown timestep_spacing {spacing!r}; valid: {', '.join(S.TIMESTEP_SPACINGS)}")


def _custom_grid(process, t, alpha, sigma):
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)  # noqa: E731
    return S.Grid(t=f32(t), alpha=f32(alpha), sigma=f32(sigma), process=process)


def scheduler_grid(name: str, schedule, num_steps: int, *, timestep_spacing: str = "linspace",
                   steps_offset: int = 0, use_karras_sigmas: bool = False, final_sigmas_type: str | None = None,
                   set_alpha_to_one: bool | None = None) -> SchedulerGrid:
    """The grid diffusers' scheduler for sampler ``name`` visits with ``num_steps`` steps (module
    docstring). ``final_sigmas_type`` / ``set_alpha_to_one`` default to the scheduler's default.

    Built from constants at trace time (concrete arrays also under ``jax.jit``)."""
    with jax.ensure_compile_time_eval():
        return _scheduler_grid(name, schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas,
                               final_sigmas_type, set_alpha_to_one)


def _scheduler_grid(name, schedule, num_steps, timestep_spacing, steps_offset, use_karras_sigmas, final_sigmas_type,
                    set_alpha_to_one):
    process, _ = _process_and_config(schedule)
    n_train = process.num_train_timesteps
    n = num_steps
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= n_train:
        raise ValueError(f"sample: num_steps must be an integer in [1, {n_train}], got {n!r}")
    n = int(n)
    kind = SCHEDULER_OF.get(name, _SIGMA_SCHEDULER)
    ac = np.asarray(process.alphas_cumprod, np.float64)
    zero_snr = ac[-1] == 0.0
    if kind not in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler") and zero_snr:
        raise ValueError(f"sample: zero-terminal-SNR schedules with {name!r}: diffusers' {kind} replaces "
                         "alphas_cumprod[-1] by 2**-24 there, which sample() does not reproduce; use 'ddim' "
                         "(Lin et al. 2024's recipe) or build a Grid yourself")
    if use_karras_sigmas and kind in ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"):
        raise ValueError(f"sample: use_karras_sigmas is not an option of diffusers' {kind} ({name!r}); "
                         f"use a sigma-space sampler (e.g. 'euler', 'heun', 'dpmpp_2m')")
    table = _diffusers_sigma_table(ac)  # VE-frame sigmas of the training steps, as diffusers has them
    with np.errstate(divide="ignore"):
        log_table = np.log(table.astype(np.float64))

    if kind in ("DDPMScheduler", "DDIMScheduler"):
        ts = S.discrete_timesteps(n_train, n, timestep_spacing, steps_offset).astype(np.float64)
        to_one = True if set_alpha_to_one is None or kind == "DDPMScheduler" else set_alpha_to_one
        a_bar = np.append(ac[ts.astype(np.int64)], 1.0 if to_one else ac[0])
        grid = _custom_grid(process, np.append(ts, 0.0), np.sqrt(a_bar), np.sqrt(1.0 - a_bar))
        return SchedulerGrid(grid, ts, 1.0, kind)

    if kind == "PNDMScheduler":
        ts = _spaced(n_train, n, timestep_spacing, steps_offset, plus_one=False)
        to_one = False if set_alpha_to_one is None else set_alpha_to_one
        a_bar = np.append(ac[ts.astype(np.int64)], 1.0 if to_one else ac[0])
        grid = _custom_grid(process, np.append(ts, 0.0), np.sqrt(a_bar), np.sqrt(1.0 - a_bar))
        return SchedulerGrid(grid, ts, 1.0, kind)

    if kind == _SIGMA_SCHEDULER:
        if timestep_spacing == "linspace":  # float timesteps, not rounded
            ts = np.linspace(0, n_train - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        else:
            ts = _spaced(n_train, n, timestep_spacing, steps_offset, plus_one=False)
        sig = np.interp(ts, np.arange(n_train), table)
        if use_karras_sigmas:
            sig = S.karras_sigmas(n, float(sig[-1]), float(sig[0]))
            ts = _sigma_to_t(sig, log_table)
        final = "zero" if final_sigmas_type is None else final_sigmas_type
        init = float(np.float32(sig.max()))
        if timestep_spacing == "leading":
            init = float(np.sqrt(np.float32(sig.max()) ** 2 + 1.0))
    else:  # the multistep / singlestep DPM-Solver, UniPC and DEIS classes
        if kind == "DPMSolverSinglestepScheduler":
            ts = _spaced(n_train, n, "linspace", 0, plus_one=True)  # no spacing option in diffusers
        else:
            ts = _spaced(n_train, n, timestep_spacing, steps_offset, plus_one=True)
        if use_karras_sigmas:
            sig = S.karras_sigmas(n, float(table[0]), float(table[-1]))
            ts = _sigma_to_t(sig, log_table)
            # diffusers rounds these (DPMSolverMultistep not for squaredcos_cap_v2, where the
            # int64 cast then truncates them)
            trunc = kind == "DPMSolverMultistepScheduler" and process.name == "discrete_vp_squaredcos_cap_v2"
            ts = np.floor(ts) if trunc else np.round(ts)
        else:
            sig = np.interp(ts, np.arange(n_train), table)
        final = "zero" if final_sigmas_type is None else final_sigmas_type
        if kind == "DEISMultistepScheduler":
            if final_sigmas_type not in (None, "sigma_min"):
                raise ValueError("sample: diffusers' DEISMultistepScheduler always ends at sigma_min "
                                 f"(final_sigmas_type={final_sigmas_type!r} is not one of its options)")
            final = "sigma_min"
        init = 1.0

    if final not in ("zero", "sigma_min"):
        raise ValueError(f"sample: final_sigmas_type must be 'zero' or 'sigma_min', got {final!r}")
    sig = np.asarray(sig, np.float32).astype(np.float64)  # diffusers holds sigmas in float32
    if final == "zero":
        grid = S.grid_from_sigmas(process, sig, final="zero")
    else:
        if use_karras_sigmas and kind in ("UniPCMultistepScheduler", "DEISMultistepScheduler"):
            last = sig[-1]  # these repeat the last Karras sigma: a zero-length last step
        else:
            last = np.float64(np.float32(table[0]))
        grid = S.grid_from_sigmas(process, np.append(sig, last), final="last")
    return SchedulerGrid(grid, ts, init, kind)


def shift_times(t, shift: float = 1.0):
    """Timestep shifting of flow-matching schedules, t' = shift t / (1 + (shift - 1) t) (Esser et
    al. 2024, "Scaling Rectified Flow Transformers", Sec. 5.3.2; diffusers' ``shift``: 3.0 for
    SD3). shift > 1 moves the steps toward t = 1 (more noise); t = 0 and t = 1 stay fixed."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = np.asarray(t, np.float64)
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_match_grid(num_steps: int, *, shift: float = 1.0, num_train_timesteps: int = 1000,
                    process: P.Process | None = None) -> SchedulerGrid:
    """The points of diffusers' ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler``
    (``use_dynamic_shifting=False``) for ``num_steps`` steps, on :class:`~jaxdiff.processes.RectifiedFlow`
    (x_t = (1 - t) x0 + t eps, t = diffusers' sigma).

    diffusers shifts its training sigmas s_i = i / T (i = T .. 1) with :func:`shift_times`, spaces
    ``num_steps`` times linearly between the first and last of those, shifts them again, and
    appends t = 0; the network is told ``timestep = T t``. (Shifting twice is diffusers' doing: the
    end point is shift(shift(1 / T)); with shift = 1 the times are linspace(1, 1 / T, N).)
    """
    process = P.RectifiedFlow() if process is None else process
    n, big_t = int(num_steps), int(num_train_timesteps)
    if n < 1:
        raise ValueError(f"flow_match_grid: num_steps must be >= 1, got {num_steps!r}")
    train = np.linspace(1, big_t, big_t, dtype=np.float32)[::-1] / np.float32(big_t)
    train = (np.float32(shift) * train / (1 + (np.float32(shift) - 1) * train)).astype(np.float32)
    s_max, s_min = float(train[0]), float(train[-1])
    times = shift_times(np.linspace(s_max * big_t, s_min * big_t, n) / big_t, shift).astype(np.float32)
    with jax.ensure_compile_time_eval():
        grid = S.grid_from_times(process, times.astype(np.float64), final="zero")
    return SchedulerGrid(grid, times.astype(np.float64) * big_t, 1.0, "FlowMatchEulerDiscreteScheduler")


def _model_time(grid: S.Grid, timesteps: np.ndarray) -> Callable | None:
    """t (process time) -> diffusers' timestep: exact at the N grid points, linear between them;
    None where the two are the same float32 numbers."""
    n = len(timesteps)
    t_grid = np.asarray(grid.t, np.float64)[:n]
    if np.array_equal(t_grid.astype(np.float32), timesteps.astype(np.float32)):
        return None
    order = np.argsort(t_grid, kind="stable")
    xp, fp = jnp.asarray(t_grid[order], jnp.float32), jnp.asarray(timesteps[order], jnp.float32)
    if n == 1:
        return lambda t: jnp.full_like(jnp.asarray(t, jnp.float32), fp[0])
    return lambda t: jnp.interp(jnp.asarray(t, jnp.float32), xp, fp)


_OPTION_DEFAULTS = {  # diffusers' defaults where the jaxdiff sampler's default differs
    "dpm_solver": {"lower_order_final": True},
}


def _config_options(name: str, cfg: Mapping) -> dict:
    """Sampler options from a diffusers scheduler config (solver order / type / algorithm,
    ``lower_order_final``, UniPC's ``disable_corrector``, PNDM's ``skip_prk_steps``); a config that names a different method than
    ``name`` raises rather than being half-applied."""
    opts = {}
    if name in ("dpm_solver", "unipc", "deis"):
        if "solver_order" in cfg:
            opts["order"] = int(cfg["solver_order"])
        if "lower_order_final" in cfg:
            opts["lower_order_final"] = bool(cfg["lower_order_final"])
    if name == "dpm_solver":
        for key, opt in (("algorithm_type", "algorithm"), ("solver_type", "solver_type")):
            if key in cfg:
                opts[opt] = cfg[key]
    if name == "unipc" and "solver_type" in cfg:
        opts["variant"] = cfg["solver_type"]
    if name == "unipc" and cfg.get("disable_corrector"):
        opts["disable_corrector"] = tuple(int(i) for i in cfg["disable_corrector"])
    if name == "dpmpp_2m":
        if cfg.get("solver_order", 2) != 2 or cfg.get("algorithm_type", "dpmsolver++") != "dpmsolver++" \
                or cfg.get("solver_type", "midpoint") != "midpoint":
            raise ValueError("sample: dpmpp_2m is DPMSolverMultistepScheduler with solver_order=2, "
                             "algorithm_type='dpmsolver++', solver_type='midpoint'; the config asks for "
                             f"{cfg.get('solver_order')}, {cfg.get('algorithm_type')!r}, {cfg.get('solver_type')!r}")
    if name in ("pndm", "plms") and "skip_prk_steps" in cfg and bool(cfg["skip_prk_steps"]) != (name == "plms"):
        raise ValueError(f"sample: the config's skip_prk_steps={cfg['skip_prk_steps']} is sampler "
                         f"{'plms' if cfg['skip_prk_steps'] else 'pndm'!r}, not {name!r}")
    return opts


def sample(name: str, model_fn: Callable, x_T, schedule, num_steps: int, *, key=None,
           prediction_type: str | None = None, timestep_spacing: str | None = None, steps_offset: int | None = None,
           use_karras_sigmas: bool | None = None, final_sigmas_type: str | None = None,
           set_alpha_to_one: bool | None = None, clip_sample: bool | None = None,
           clip_sample_range: float | None = None, variance_type: str | None = None, **options):
    """Sample with jaxdiff sampler ``name`` the way diffusers' matching scheduler would (module docstring).

    Args:
      name: a registered sampler (``jaxdiff.samplers.available()``).
      model_fn: ``model_fn(x, timestep) -> output``; ``x`` the (VP-frame) state, exactly what a
        diffusers pipeline hands its UNet after ``scale_model_input``; ``timestep`` a float32 array
        of shape (batch,) with diffusers' timestep; the output is eps, v or x0 per ``prediction_type``.
      x_T: unit Gaussian noise of the sample's shape (batch first); its dtype is kept.
      schedule: a :class:`~jaxdiff.processes.DiscreteVP`, a diffusers ``beta_schedule`` name, or a
        mapping of diffusers scheduler-config keys (``beta_schedule``, ``beta_start``, ``beta_end``,
        ``num_train_timesteps``, ``rescale_betas_zero_snr``, ``trained_betas``, and the scheduler
        keys below as defaults; ``solver_order``, ``solver_type``, ``algorithm_type``,
        ``lower_order_final`` become sampler options; keys that change the result and are not
        implemented -- ``thresholding``, ``use_exponential_sigmas``, ... -- raise; others are ignored).
      num_steps: number of sampling steps (diffusers' ``num_inference_steps``), 1 .. T.
      key: PRNG key (stochastic samplers need one).
      prediction_type: ``"epsilon"`` (default), ``"v_prediction"`` or ``"sample"``.
      timestep_spacing: ``"linspace"`` (default), ``"leading"`` or ``"trailing"``.
      steps_offset: diffusers' ``steps_offset`` for "leading" spacing (default 0).
      use_karras_sigmas: Karras et al. 2022 sigmas (sigma-space and DPM-Solver / UniPC / DEIS).
      final_sigmas_type: ``"zero"`` or ``"sigma_min"`` (default: the scheduler's).
      set_alpha_to_one: DDIM / PNDM final point (default: the scheduler's, True / False).
      clip_sample, clip_sample_range: DDPM / DDIM clip x0_hat to [-range, range] -- diffusers'
        default is True, 1.0 (pass ``clip_sample=False`` for latent models, as Stable Diffusion's
        config does).
      variance_type: DDPM's reverse variance, ``"fixed_small"`` (default), ``"fixed_large"`` or
        ``"learned_range"`` (iDDPM; ``model_fn`` then returns ``2 C`` channels, the prediction and
        the variance interpolation, which diffusers' ``DDPMScheduler.step`` splits the same way);
        ``ddpm`` only.
      **options: passed to the sampler (e.g. ``eta`` for ddim, ``order`` for unipc).

    Returns:
      The final state, same shape and dtype as ``x_T``.
    """
    from jaxdiff.samplers import get  # late import: samplers/__init__ imports this module

    fn = get(name)  # ValueError listing the valid names
    process, cfg = _process_and_config(schedule)
    pick = lambda v, k, d: v if v is not None else cfg.get(k, d)  # noqa: E731
    prediction_type = pick(prediction_type, "prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"sample: unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    spacing = pick(timestep_spacing, "timestep_spacing", "linspace")
    if spacing not in S.TIMESTEP_SPACINGS:
        raise ValueError(f"sample: unknown timestep_spacing {spacing!r}; valid: {', '.join(S.TIMESTEP_SPACINGS)}")
    sg = scheduler_grid(name, process, num_steps, timestep_spacing=spacing,
                        steps_offset=int(pick(steps_offset, "steps_offset", 0)),
                        use_karras_sigmas=bool(pick(use_karras_sigmas, "use_karras_sigmas", False)),
                        final_sigmas_type=pick(final_sigmas_type, "final_sigmas_type", None),
                        set_alpha_to_one=pick(set_alpha_to_one, "set_alpha_to_one", None))
    tmap = _model_time(sg.grid, sg.timesteps)
    net = model_fn if tmap is None else (lambda x, t: model_fn(x, tmap(t)))
    variance_type = pick(variance_type, "variance_type", "fixed_small")
    if variance_type not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"sample: variance_type={variance_type!r} is not supported; valid: fixed_small, "
                         "fixed_large, learned_range")
    if variance_type != "fixed_small" and name != "ddpm":
        raise ValueError(f"sample: variance_type={variance_type!r} is an option of the ddpm sampler "
                         f"(diffusers' DDPMScheduler), not of {name!r}")
    if variance_type != "fixed_small" and float(np.asarray(sg.timesteps)[-1]) > 0:
        raise ValueError(f"sample: ddpm with variance_type={variance_type!r} on a grid whose last timestep is "
                         f"{int(np.asarray(sg.timesteps)[-1])} (timestep_spacing={spacing!r}): diffusers' "
                         "DDPMScheduler adds noise on that last step (variance beta, or the learned one against "
                         "beta~ clamped to 1e-20), jaxdiff's ddpm ends on the posterior mean as iDDPM does; use a "
                         "spacing whose last timestep is 0 (leading, linspace)")
    if variance_type == "learned_range":
        denoise = PZ.make_denoiser_with_variance(net, process, prediction_type)
    else:
        denoise = PZ.make_denoiser(net, process, prediction_type)

    if name == "dpmpp_2m" and sg.grid.num_steps < 15 and np.asarray(sg.grid.sigma)[-1] > 0:
        raise ValueError("sample: dpmpp_2m into sigma_min with num_steps < 15: diffusers' lower_order_final takes "
                         "a first-order last step there, jaxdiff's dpmpp_2m does not; use num_steps >= 15, "
                         "final_sigmas_type='zero', or 'unipc' with order=2, disable_corrector=range(num_steps)")
    opts = dict(_OPTION_DEFAULTS.get(name, {}))
    opts.update(_config_options(name, cfg))
    if name in ("ddpm", "ddim"):  # diffusers' DDPMScheduler / DDIMScheduler clip x0_hat by default
        clip = pick(clip_sample, "clip_sample", True)
        opts["clip_denoised"] = float(pick(clip_sample_range, "clip_sample_range", 1.0)) if clip else None
    elif clip_sample:
        raise ValueError(f"sample: clip_sample is an option of diffusers' DDPM / DDIM schedulers, not of {name!r}")
    if variance_type != "fixed_small":
        opts["variance"] = variance_type
    if name in ("pndm", "plms"):
        opts["combine"] = "v" if prediction_type == "v_prediction" else "eps"  # what diffusers combines
    opts.update(options)

    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise TypeError(f"sample: x_T must be a floating array, got dtype {x_T.dtype}")
    scale = sg.init_noise_sigma * sg.grid.alpha[0]  # 1 for the VP-space schedulers
    x = x_T if sg.init_noise_sigma == 1.0 else (x_T.astype(jnp.float32) * scale).astype(x_T.dtype)
    return fn(denoise, x, sg.grid, key=key, **opts)

