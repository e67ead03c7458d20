"""``jaxdiff.samplers.sample`` against diffusers' own scheduler loop, one to one.

The user's view: a diffusers scheduler (``set_timesteps``, ``init_noise_sigma``,
``scale_model_input``, ``step``) driving a network ``model(x, timestep)`` from unit noise, and
``sample(name, model_fn, noise, schedule, N, ...)`` with the same network, the same noise and the
scheduler's config. Nothing about the grid is taken from diffusers' objects: ``sample`` builds it.
The network is a smooth nonlinear function of (x, timestep), written identically in torch and jax,
that depends on the timestep (so the network must be told diffusers' exact timestep), read as
eps, v or x0. Final samples agree to 1e-4 relative (max |a - b| / max |b|); 1e-3 for the
sigma-space samplers on squaredcos_cap_v2 (see ``tolerance``).

Where diffusers' own float32 rounding is near that (squaredcos_cap_v2 in the sigma-space classes,
sigma_max ~ 2e4: see tests/samplers/test_vs_diffusers.py), the same diffusers loop also runs in
float64 (every float tensor of the scheduler cast after ``set_timesteps``, float64 noise and
network; EulerDiscrete-type ``step`` casts its sample to float32, so those stay float32 there) and
jaxdiff must be within 1e-4 of the float64 run or within 1e-4 + 2 x diffusers' own float32 error
of the float32 one (the bound of test_diffusers_family.py).

Stochastic samplers (ddpm, euler_ancestral) get diffusers' ``randn_tensor`` replaced by jaxdiff's
per-step noise (``normal(split(key, N)[i])``, samplers.base).
"""

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import samplers  # noqa: E402
from jaxdiff.samplers import api  # noqa: E402

TOL = 1e-4
SHAPE = (2, 3, 4, 4)
RNG = np.random.default_rng(3)
NOISE = RNG.standard_normal(SHAPE).astype(np.float32)
W = (0.5 * RNG.standard_normal((3, 3))).astype(np.float32)
T_COEF = 2e-3  # how strongly the network depends on the timestep
SCHEDULE_KW = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}

# sampler -> (diffusers scheduler class name, extra constructor kwargs)
DIFFUSERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", dict(skip_prk_steps=False)),
    "plms": ("PNDMScheduler", dict(skip_prk_steps=True)),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "dpm_solver": ("DPMSolverSinglestepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm2": ("KDPM2DiscreteScheduler", {}),
}
STOCHASTIC = {"ddpm": "scheduling_ddpm", "euler_ancestral": "scheduling_euler_ancestral_discrete"}
KEY = jax.random.key(11, impl="rbg")


def torch_net(x, t):
    mix = torch.einsum("ij,bjhw->bihw", torch.from_numpy(W).to(x.dtype), x)
    return 0.9 * torch.tanh(0.5 * (x + 0.2 * mix) + T_COEF * float(t))


def jax_net(x, t):  # t: (batch,) diffusers' timestep
    mix = jnp.einsum("ij,bjhw->bihw", jnp.asarray(W), x)
    return 0.9 * jnp.tanh(0.5 * (x + 0.2 * mix) + T_COEF * jnp.reshape(t, (-1, 1, 1, 1)))


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def make_scheduler(name, schedule, pred, spacing, karras=False, **kw):
    cls, extra = DIFFUSERS[name]
    kw = dict(extra, beta_schedule=schedule, prediction_type=pred, timestep_spacing=spacing, **SCHEDULE_KW[schedule],
              **kw)
    if name == "dpm_solver":  # DPMSolverSinglestepScheduler has no spacing option (api docstring)
        del kw["timestep_spacing"]
    if karras:
        kw["use_karras_sigmas"] = True
    return getattr(diffusers, cls)(**kw)


def diffusers_loop(sched, n, monkeypatch, noise=None, double=False):
    """What a diffusers pipeline does (float32, or the same code in float64)."""
    sched.set_timesteps(n)
    dtype = torch.float64 if double else torch.float32
    if double:
        for k, v in list(vars(sched).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(sched, k, v.to(torch.float64))
    state = {"i": 0}
    if noise is not None:
        import importlib

        mod = importlib.import_module(f"diffusers.schedulers.{noise[0]}")
        monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: noise[1][state["i"]].to(k.get("dtype", dtype)))
    x = torch.from_numpy(NOISE.copy()).to(dtype) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        state["i"] = i
        out = torch_net(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x).prev_sample
    return x.double().numpy()


def step_noise(n):
    keys = jax.random.split(KEY, n)
    return [torch.from_numpy(np.asarray(jax.random.normal(k, SHAPE, jnp.float32))) for k in keys]


def ours(name, schedule, pred, spacing, n, karras=False, jit=True, **kw):
    schedule_cfg = dict(beta_schedule=schedule, **SCHEDULE_KW[schedule])

    def run(x, key):
        return api.sample(name, jax_net, x, schedule_cfg, n, key=key, prediction_type=pred, timestep_spacing=spacing,
                          use_karras_sigmas=karras, **kw)

    key = KEY if samplers.get(name).stochastic else None
    fn = jax.jit(run) if jit else run
    return np.asarray(fn(jnp.asarray(NOISE), key), np.float64)


def tolerance(name, schedule, pred):
    """1e-4; 1e-3 for the sigma-space samplers on squaredcos_cap_v2, whose first point is
    sigma / alpha ~ 2e4 (alpha ~ 5e-5), as tests/samplers/test_vs_diffusers.py holds Euler / Heun
    there: jaxdiff's float32 steps in (alpha, sigma) coordinates keep 3-4 digits from that start
    (measured here up to 1.6e-4 for eps-, 4.2e-4 for sample-prediction Heun, while diffusers' float32
    and float64 runs agree to < 1e-6)."""
    sigma_space = name not in api.SCHEDULER_OF
    return 1e-3 if (sigma_space and schedule == "squaredcos_cap_v2") else TOL


def check(name, schedule, pred, spacing, n, karras=False, monkeypatch=None, sched_kw=None, **kw):
    sched_kw = sched_kw or {}
    tol = tolerance(name, schedule, pred)
    noise = (STOCHASTIC[name], step_noise(n)) if name in STOCHASTIC else None
    theirs = diffusers_loop(make_scheduler(name, schedule, pred, spacing, karras, **sched_kw), n, monkeypatch, noise)
    mine = ours(name, schedule, pred, spacing, n, karras, **kw, **sched_kw)
    err = rel_err(mine, theirs)
    if err < tol:
        return err
    # diffusers' own float32 error near the tolerance: compare with its float64 run too
    ref = diffusers_loop(make_scheduler(name, schedule, pred, spacing, karras, **sched_kw), n, monkeypatch, noise,
                         double=True)
    own = rel_err(theirs, ref)
    assert rel_err(mine, ref) < tol or err < tol + 2 * own, (err, rel_err(mine, ref), own)
    return err


# ------------------------------------------------------------------------------------------
# Default set: every scheduler class, beta schedule, prediction type and spacing appears once.
# ------------------------------------------------------------------------------------------

CURATED = [
    # name, schedule, pred, spacing, n, karras
    ("ddim", "scaled_linear", "epsilon", "leading", 10, False),
    ("ddim", "linear", "v_prediction", "trailing", 10, False),
    ("ddpm", "squaredcos_cap_v2", "sample", "linspace", 8, False),
    ("plms", "scaled_linear", "epsilon", "leading", 10, False),
    ("pndm", "linear", "v_prediction", "leading", 20, False),  # PRK warm-up; v outputs combined
    ("dpmpp_2m", "scaled_linear", "epsilon", "leading", 10, True),  # "DPM++ 2M Karras"
    ("dpmpp_2m", "linear", "v_prediction", "linspace", 8, False),
    ("unipc", "squaredcos_cap_v2", "sample", "trailing", 8, False),
    ("deis", "linear", "epsilon", "linspace", 8, False),
    ("dpm_solver", "scaled_linear", "v_prediction", "linspace", 9, False),
    ("euler", "scaled_linear", "epsilon", "linspace", 10, False),  # float timesteps
    ("euler", "linear", "v_prediction", "leading", 8, True),
    ("heun", "squaredcos_cap_v2", "sample", "trailing", 6, False),
    ("lms", "scaled_linear", "epsilon", "leading", 10, False),
    ("dpm2", "linear", "epsilon", "trailing", 6, True),
    ("euler_ancestral", "scaled_linear", "v_prediction", "trailing", 8, False),
]


@pytest.mark.parametrize("name,schedule,pred,spacing,n,karras", CURATED, ids=lambda v: str(v))
def test_sample_matches_diffusers(name, schedule, pred, spacing, n, karras, monkeypatch):
    check(name, schedule, pred, spacing, n, karras, monkeypatch)


def test_options_and_config_mapping(monkeypatch):
    """Scheduler options reach the grid (steps_offset, set_alpha_to_one, final_sigmas_type) and
    a diffusers config dict works as the schedule, the same as keyword arguments."""
    check("ddim", "linear", "epsilon", "leading", 10, monkeypatch=monkeypatch,
          sched_kw=dict(steps_offset=1, set_alpha_to_one=False))
    check("dpmpp_2m", "linear", "epsilon", "trailing", 16, monkeypatch=monkeypatch,
          sched_kw=dict(final_sigmas_type="sigma_min"))  # (N >= 15: no lower_order_final, api docstring)
    cfg = dict(diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False,
                                       clip_sample=False).config)
    by_cfg = np.asarray(jax.jit(lambda x: api.sample("ddim", jax_net, x, cfg, 10))(jnp.asarray(NOISE)))
    by_kw = ours("ddim", "scaled_linear", "epsilon", "leading", 10, steps_offset=1, set_alpha_to_one=False,
                 clip_sample=False)
    np.testing.assert_array_equal(by_cfg, by_kw)
    # and the options matter (else the checks above prove nothing about them)
    plain = ours("ddim", "scaled_linear", "epsilon", "leading", 10, clip_sample=False)
    assert rel_err(plain, by_kw) > 1e-3
    # solver options from a config: UniPC-3, Karras, v-prediction. (diffusers itself fails with
    # final_sigmas_type="sigma_min" here -- it repeats the last Karras sigma and the zero-length step
    # is 0 / 0 -- and with lower_order_final=False into sigma = 0: a singular solve.)
    sched = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_order=3, use_karras_sigmas=True,
                                              prediction_type="v_prediction")
    cfg = dict(sched.config)
    theirs = diffusers_loop(sched, 9, monkeypatch)
    mine = np.asarray(jax.jit(lambda x: api.sample("unipc", jax_net, x, cfg, 9))(jnp.asarray(NOISE)))
    assert rel_err(mine, theirs) < TOL, rel_err(mine, theirs)
    cfg2 = dict(cfg, solver_order=2)
    order2 = np.asarray(jax.jit(lambda x: api.sample("unipc", jax_net, x, cfg2, 9))(jnp.asarray(NOISE)))
    assert rel_err(order2, theirs) > 1e-4  # the config's solver_order was applied
    with pytest.raises(ValueError, match="skip_prk_steps"):
        api.sample("pndm", jax_net, jnp.asarray(NOISE), dict(diffusers.PNDMScheduler(skip_prk_steps=True).config), 10)


def test_unipc_config_keys_are_applied_or_refused(monkeypatch):
    """UniPC's disable_corrector from a config reaches the sampler (as diffusers applies it);
    predict_x0=False / a solver_p are refused, not dropped."""
    sched = diffusers.UniPCMultistepScheduler(beta_schedule="linear", disable_corrector=[0, 1, 2, 3])
    cfg = dict(sched.config)
    theirs = diffusers_loop(sched, 8, monkeypatch)
    mine = np.asarray(jax.jit(lambda x: api.sample("unipc", jax_net, x, cfg, 8))(jnp.asarray(NOISE)))
    assert rel_err(mine, theirs) < TOL, rel_err(mine, theirs)
    corrected = np.asarray(jax.jit(lambda x: api.sample("unipc", jax_net, x, dict(cfg, disable_corrector=[]),
                                                        8))(jnp.asarray(NOISE)))
    assert rel_err(corrected, theirs) > 1e-3  # the corrector matters here, so the check above is one
    for key, value in (("predict_x0", False), ("solver_p", "dpmsolver++")):
        with pytest.raises(ValueError, match=f"{key}="):
            api.sample("unipc", jax_net, jnp.asarray(NOISE), dict(cfg, **{key: value}), 8)


def test_errors():
    x = jnp.asarray(NOISE)
    with pytest.raises(ValueError, match="unknown sampler 'eulr'.*available: .*euler"):
        api.sample("eulr", jax_net, x, "linear", 10)
    with pytest.raises(ValueError, match="prediction_type 'eps'.*epsilon, v_prediction, sample"):
        api.sample("euler", jax_net, x, "linear", 10, prediction_type="eps")
    for bad in (0, -3, 2.5, 1001):
        with pytest.raises(ValueError, match=r"num_steps must be an integer in \[1, 1000\]"):
            api.sample("euler", jax_net, x, "linear", bad)
    with pytest.raises(ValueError, match="timestep_spacing 'uniform'"):
        api.sample("ddim", jax_net, x, "linear", 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="use_karras_sigmas is not an option"):
        api.sample("ddim", jax_net, x, "linear", 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="thresholding"):
        api.sample("ddim", jax_net, x, {"beta_schedule": "linear", "thresholding": True}, 10)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        api.sample("euler", jax_net, x, {"beta_schedule": "linear", "rescale_betas_zero_snr": True}, 10)
    with pytest.raises(TypeError, match="schedule must be"):
        api.sample("euler", jax_net, x, 3, 10)
    with pytest.raises(ValueError, match="lower_order_final"):
        api.sample("dpmpp_2m", jax_net, x, "linear", 8, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="stochastic: pass key"):
        api.sample("ddpm", jax_net, x, "linear", 10)


def test_exported_and_jit_static_steps():
    assert samplers.sample is api.sample and "sample" in samplers.__all__
    f = jax.jit(lambda x: samplers.sample("euler", jax_net, x, "linear", 4))
    out = f(jnp.asarray(NOISE))
    assert out.shape == SHAPE and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    low = samplers.sample("euler", jax_net, jnp.asarray(NOISE, jnp.bfloat16), "linear", 4)
    assert low.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------
# The full matrix (slow): samplers x beta schedules x prediction types x spacings (x Karras).
# ------------------------------------------------------------------------------------------

MATRIX_NAMES = ("ddim", "ddpm", "plms", "pndm", "dpmpp_2m", "unipc", "deis", "dpm_solver", "euler", "heun", "lms",
                "dpm2", "euler_ancestral")
KARRAS_OK = ("dpmpp_2m", "unipc", "deis", "dpm_solver", "euler", "heun", "lms", "dpm2")


def _skip_reason(name, schedule, pred, spacing, n, karras):
    if pred == "sample" and name in ("dpm2", "euler_ancestral", "pndm", "plms"):
        return f"diffusers' {DIFFUSERS[name][0]} does not implement prediction_type='sample'"
    if name in ("ddim", "pndm", "plms") and (spacing == "linspace" or (spacing == "trailing" and 1000 % n)):
        return "diffusers steps t -> t - T // N, not to its next timestep: no grid (module docstring of api)"
    if name == "pndm" and (1000 // n) % 2:
        return "PRK with odd T // N: diffusers evaluates its midpoint one timestep off (test_diffusers_family)"
    if name in ("pndm", "plms", "deis") and schedule == "squaredcos_cap_v2" and spacing != "leading":
        return "eps space from t = 999 on squaredcos_cap_v2 (test_diffusers_family docstring)"
    if name == "dpm_solver" and schedule == "squaredcos_cap_v2" and pred == "epsilon":
        return "eps-prediction from t = 999 on squaredcos_cap_v2 (x0_hat ~ 1e4; test_vs_diffusers docstring)"
    if karras and schedule == "squaredcos_cap_v2" and name == "dpm2":
        return "diffusers' KDPM2DiscreteScheduler returns NaN here"
    if karras and schedule == "squaredcos_cap_v2" and name in ("dpmpp_2m", "dpm_solver", "unipc", "deis"):
        return "diffusers' own loop fails here (truncated / rounded Karras timesteps collide)"
    return None


_COMBOS = [c for c in itertools.product(MATRIX_NAMES, SCHEDULE_KW, ("epsilon", "v_prediction", "sample"),
                                        ("linspace", "leading", "trailing"), (False, True))
           if not c[4] or c[0] in KARRAS_OK]
MATRIX = [c[:4] + ((10, 25, 8)[i % 3], c[4]) for i, c in enumerate(_COMBOS)]  # step counts cycle


@pytest.mark.slow
@pytest.mark.parametrize("name,schedule,pred,spacing,n,karras", MATRIX, ids=lambda v: str(v))
def test_sample_matrix(name, schedule, pred, spacing, n, karras, monkeypatch):
    reason = _skip_reason(name, schedule, pred, spacing, n, karras)
    if reason:
        pytest.skip(reason)
    check(name, schedule, pred, spacing, n, karras, monkeypatch)
