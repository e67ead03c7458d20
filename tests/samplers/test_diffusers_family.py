"""DPM-Solver (singlestep), UniPC, DEIS and PNDM / PLMS: parity with diffusers, and convergence
order on Gaussian data.

1. diffusers parity. The same deterministic "network" (eps_hat-like output
   0.9 tanh(0.5 (x + 0.2 W x) + 1e-3 t), read as epsilon / v / x0 per prediction type, written
   identically in torch and jax), the same initial noise; diffusers' scheduler loop in torch on
   CPU against the jaxdiff sampler on the scheduler's own points, thresholding / clipping off.
   diffusers runs twice: in float32, and the same scheduler code in float64 (its float32 tables
   converted after ``set_timesteps``, float64 noise and network). jaxdiff (float32) must agree with
   the float64 run to 1e-4 relative (max |a - b| / max |b|), and with the float32 run to 1e-4 plus
   twice diffusers' own float32 error. The float64 run is needed for DEIS-3: diffusers evaluates
   its Lagrange coefficients as differences of ``ind_fn`` values that cancel in float32 (up to
   3e-4 off its own float64 result, e.g. squaredcos_cap_v2 "sample" N = 50); jaxdiff's Newton form
   with phi-functions does not cancel (1e-6 from float64).

   Grids: ``Grid(t = scheduler timesteps + [0], alpha, sigma)`` with (alpha, sigma) from the
   scheduler's own float32 numbers -- ``sigmas`` (VE frame, alpha = 1 / sqrt(1 + s^2)) for the
   DPM-Solver / UniPC / DEIS schedulers, ``alphas_cumprod`` for PNDM. The last point is diffusers'
   final one: sigma = 0 (``final_sigmas_type="zero"``, PNDM ``set_alpha_to_one=True``) or the
   first training step (``"sigma_min"``, DEIS always, PNDM's default). This matters for
   squaredcos_cap_v2, whose float32 sigma_min = sqrt(1 - alphas_cumprod[0]) is 1.5e-3 off the
   exact value (1 - 4e-5 rounded to float32).

Not comparable (documented by tests at the end rather than compared):

* PNDM with "linspace" spacing (and "trailing" when N does not divide 1000): diffusers steps from t
  to t - 1000 // N, not to its next timestep, as DDIM does (tests/samplers/test_vs_diffusers.py).
* PNDM's PRK warm-up when (1000 // N) is odd: diffusers moves the state to t - (1000 // N) // 2 but
  evaluates the model there at timestep t' + (1000 // N) // 2, one timestep off; jaxdiff uses one
  midpoint t - floor((t - t') / 2). Compared for even ratios (N = 10, 20, 50); the odd-ratio gap is
  ~6e-5 at N = 8.
* UniPC ``bh1`` into sigma = 0: diffusers returns NaN (B(h) = h = -inf times a zero residual at the
  last step); compared with ``final_sigmas_type="sigma_min"``. ``dpmsolver`` (noise prediction)
  with ``final_sigmas_type="zero"`` is refused by diffusers; compared with "sigma_min".
* eps-space samplers (PNDM / PLMS, DEIS, DPM-Solver with ``algorithm="dpmsolver"``) on
  squaredcos_cap_v2 from t = 999 (trailing / linspace spacing, and always for the singlestep
  scheduler, which has no spacing option; alpha = 4.9e-5): this test network is no denoiser,
  x0_hat = (x - sigma eps) / alpha ~ 1e4 and the state grows to |x| ~ 1e3 .. 1e4. jaxdiff's one
  model interface is x0_hat, so an eps-space sampler recovers eps = (x - alpha x0_hat) / sigma,
  which keeps ~1e-7 |x| absolute, not ~1e-7 |eps|; the first step amplifies that by
  alpha' / alpha ~ 1600 (observed 3e-5 .. 2e-4 relative while diffusers float32 and float64 agree
  to 3e-7; with v-prediction diffusers' own float32 run is 0.14 off its float64 run). Compared on
  "leading" (t <= 950) there, and for noise-prediction DPM-Solver on the other two schedules.

2. Closed form. Data N(0, c^2), exact denoiser x0_hat = alpha c^2 / (alpha^2 c^2 + sigma^2) x,
   exact PF-ODE map x(t) = x(t0) sqrt(alpha^2 c^2 + sigma^2)(t) / sqrt(...)(t0), on VPLinear with a
   log-SNR-uniform grid from t = 1 (sigma/alpha = 152) to sigma/alpha = 0.05 ending there
   (``final="last"``, so no final jump to sigma = 0 hides the error), N = 12, 24, 48, 96 (multiples
   of 6: whole singlestep groups). Fitted log-log slopes against the declared orders:

   * dpm_solver order k: k (1, 2, 3; measured 0.97, 1.87, 3.01);
   * unipc order p with corrector: p + 1 (Zhao et al. 2023, Theorem 3.1; measured 1.95, 2.95 for
     p = 1, 2). For p = 3 the warm-up (step 0 is UniP-1 + UniC-1, local error O(h^3)) caps the
     asymptotic order at 3, below the paper's 4; measured 3.44: asserted within [2.7, 4.3];
   * deis order k: k for k = 1, 2 (0.97, 1.93). DEIS-3 measures 4.1 here, with growing local
     slopes (3.7, 4.0, 4.7): error terms cancel (its warm-up steps, orders 1 and 2, add an O(h^2)
     term with a tiny constant, as eps_hat is nearly constant at high noise), and float32 round-off
     (~1e-6 at N = 192) stops a finer look; asserted >= 2.7 only;
   * plms / pndm: 2 (measured 2.07), not the 4 of their Adams-Bashforth weights: the weights
     extrapolate eps as a polynomial in the step index while the transfer integrates eps against
     d(sigma/alpha), whose weighted mean over a step differs from the plain one at O(h^2).
   ``lower_order_final=False`` throughout: a first-order last step would cap every order at 2.
"""

import itertools
from typing import NamedTuple

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxdiff import parameterization as PZ
from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S
from jaxdiff.samplers.dpm_solver import dpmpp_2m
from tests.samplers.gaussian import gaussian_denoiser

TOL = 1e-4
SHAPE = (2, 3, 4, 4)
RNG = np.random.default_rng(1)
NOISE = RNG.standard_normal(SHAPE).astype(np.float32)
W = (0.5 * RNG.standard_normal((3, 3))).astype(np.float32)  # channel mixing of the "network"
SCHEDULE_KW = {
    "linear": dict(beta_start=1e-4, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(),
}
NAMES = ("dpm_solver", "unipc", "deis", "pndm", "plms")


def _diffusers():
    pytest.importorskip("torch")
    return pytest.importorskip("diffusers")


def torch_net(x, t):
    import torch

    mix = torch.einsum("ij,bjhw->bihw", torch.from_numpy(W).to(x.dtype), x)
    return 0.9 * torch.tanh(0.5 * (x + 0.2 * mix) + 1e-3 * float(t))


def jax_net(x, t):  # t: (batch,), diffusers' timestep
    mix = jnp.einsum("ij,bjhw->bihw", jnp.asarray(W), x)
    return 0.9 * jnp.tanh(0.5 * (x + 0.2 * mix) + 1e-3 * jnp.reshape(t, (-1, 1, 1, 1)))


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def diffusers_loop(sched, double=False):
    """diffusers' sampling loop; ``double`` runs the same scheduler code in float64 (its float32
    tables converted after ``set_timesteps``, float64 noise and network)."""
    import torch

    if double:
        for k, v in list(vars(sched).items()):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                setattr(sched, k, v.to(torch.float64))
    x = torch.from_numpy(NOISE.copy()).to(torch.float64 if double else torch.float32) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(torch_net(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x.numpy()


class Parity(NamedTuple):
    vs64: float  # jaxdiff vs diffusers in float64
    vs32: float  # jaxdiff vs diffusers in float32
    own: float  # diffusers float32 vs float64

    def check(self):
        assert self.vs64 < TOL, self
        assert self.vs32 < TOL + 2 * self.own, self
        return self


def compare(make, n, name, grid_fn, proc, pred, **kw):
    """Run scheduler ``make()`` with ``n`` steps in float32 and float64 and the jaxdiff sampler
    ``name`` on ``grid_fn(scheduler, proc)``."""
    s32, s64 = make(), make()
    s32.set_timesteps(n)
    s64.set_timesteps(n)
    theirs, ref = diffusers_loop(s32), diffusers_loop(s64, double=True)
    ours = jax_sample(name, proc, grid_fn(s32, proc), pred, **kw)
    return Parity(rel_err(ours, ref), rel_err(ours, theirs), rel_err(theirs, ref))


def _grid(proc, t, alpha, sigma):
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float64), jnp.float32)  # noqa: E731
    return S.Grid(t=f32(t), alpha=f32(alpha), sigma=f32(sigma), process=proc)


def sigma_grid(sched, proc):
    """The scheduler's timesteps + a final t = 0, (alpha, sigma) from its float32 VE sigmas."""
    ts = sched.timesteps.numpy().astype(np.float64)
    s = sched.sigmas.numpy().astype(np.float64)
    assert s.shape == (len(ts) + 1,)
    alpha = 1.0 / np.sqrt(1.0 + s**2)
    return _grid(proc, np.append(ts, 0.0), alpha, s * alpha)


def pndm_grid(sched, proc):
    """PNDM's full points: _timesteps (decreasing) + the final point diffusers steps to."""
    ts = sched._timesteps[::-1].astype(np.int64)
    n = sched.num_inference_steps
    # PLMS steps from t to t - 1000 // N: it must be the next point (see the module docstring)
    np.testing.assert_array_equal(ts[:-1] - ts[1:], 1000 // n)
    assert ts[-1] - 1000 // n < 0  # ... and the last step goes to the final point
    ac = sched.alphas_cumprod.numpy().astype(np.float64)
    a_fin = float(sched.final_alpha_cumprod)
    alpha_bar = np.append(ac[ts], a_fin)
    return _grid(proc, np.append(ts, 0.0), np.sqrt(alpha_bar), np.sqrt(1.0 - alpha_bar))


def jax_sample(name, proc, grid, pred, **kw):
    den = PZ.make_denoiser(jax_net, proc, pred)
    fn = jax.jit(lambda x, g: samplers.get(name)(den, x, g, **kw))
    return np.asarray(fn(jnp.asarray(NOISE), grid))


def _process(schedule):
    return P.discrete_vp(schedule, **SCHEDULE_KW[schedule])


# ------------------------------------------------------------------------------------------
# Checks (shared by the curated cases and the slow sweeps).
# ------------------------------------------------------------------------------------------


def check_dpm_solver(schedule, pred, n, order, algorithm="dpmsolver++", solver_type="midpoint", lof=False):
    diffusers = _diffusers()
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers refuses dpmsolver + zero

    def make():  # set_timesteps may force lower_order_final (zero final, n % order): jaxdiff must too
        return diffusers.DPMSolverSinglestepScheduler(
            beta_schedule=schedule, prediction_type=pred, solver_order=order, algorithm_type=algorithm,
            solver_type=solver_type, lower_order_final=lof, final_sigmas_type=final, **SCHEDULE_KW[schedule])

    return compare(make, n, "dpm_solver", sigma_grid, _process(schedule), pred, order=order,
                   algorithm=algorithm, solver_type=solver_type, lower_order_final=lof)


def check_unipc(schedule, pred, n, spacing, order, variant="bh2", lof=True, disable=()):
    diffusers = _diffusers()
    final = "zero" if variant == "bh2" else "sigma_min"  # bh1 into zero: NaN in diffusers

    def make():
        return diffusers.UniPCMultistepScheduler(
            beta_schedule=schedule, prediction_type=pred, solver_order=order, solver_type=variant,
            lower_order_final=lof, disable_corrector=list(disable), timestep_spacing=spacing,
            final_sigmas_type=final, **SCHEDULE_KW[schedule])

    return compare(make, n, "unipc", sigma_grid, _process(schedule), pred, order=order, variant=variant,
                   lower_order_final=lof, disable_corrector=tuple(disable))


def check_deis(schedule, pred, n, spacing, order, lof=True):
    diffusers = _diffusers()

    def make():
        return diffusers.DEISMultistepScheduler(
            beta_schedule=schedule, prediction_type=pred, solver_order=order, lower_order_final=lof,
            timestep_spacing=spacing, **SCHEDULE_KW[schedule])

    return compare(make, n, "deis", sigma_grid, _process(schedule), pred, order=order, lower_order_final=lof)


def check_pndm(schedule, pred, n, spacing, prk=True, alpha_to_one=False, offset=0):
    diffusers = _diffusers()

    def make():
        return diffusers.PNDMScheduler(
            beta_schedule=schedule, prediction_type=pred, skip_prk_steps=not prk, set_alpha_to_one=alpha_to_one,
            timestep_spacing=spacing, steps_offset=offset, **SCHEDULE_KW[schedule])

    sched = make()
    sched.set_timesteps(n)
    assert len(sched.timesteps) == (n + 9 if prk else n + 1)  # model calls: 12 PRK + (N - 3), or N + 1
    # diffusers combines the raw network outputs: v for a v-prediction model (see pndm.plms)
    combine = "v" if pred == "v_prediction" else "eps"
    return compare(make, n, "pndm" if prk else "plms", pndm_grid, _process(schedule), pred, combine=combine)


# ------------------------------------------------------------------------------------------
# Curated parity cases: every scheduler meets every beta schedule, prediction type, spacing,
# order and several step counts.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,pred,n,order,algorithm,solver_type,lof", [
    ("linear", "epsilon", 20, 1, "dpmsolver++", "midpoint", False),
    ("scaled_linear", "v_prediction", 8, 2, "dpmsolver++", "midpoint", False),
    ("squaredcos_cap_v2", "sample", 50, 3, "dpmsolver++", "heun", False),
    ("linear", "v_prediction", 20, 3, "dpmsolver++", "midpoint", True),
    # noise prediction, sigma_min end, lower_order_final=False with 21 % 3 == 0: a full last group
    ("scaled_linear", "epsilon", 21, 3, "dpmsolver", "heun", False),
    ("linear", "sample", 8, 2, "dpmsolver", "midpoint", True),  # (eps space: no squaredcos, docstring)
])
def test_dpm_solver_vs_diffusers(schedule, pred, n, order, algorithm, solver_type, lof):
    check_dpm_solver(schedule, pred, n, order, algorithm, solver_type, lof).check()


@pytest.mark.parametrize("schedule,pred,n,spacing,order,variant,lof,disable", [
    ("linear", "epsilon", 20, "linspace", 2, "bh2", True, ()),
    ("scaled_linear", "v_prediction", 8, "leading", 3, "bh2", True, ()),
    ("squaredcos_cap_v2", "sample", 50, "trailing", 1, "bh2", True, ()),
    ("linear", "v_prediction", 20, "trailing", 3, "bh1", True, (0, 1)),
    ("scaled_linear", "epsilon", 8, "linspace", 2, "bh1", False, ()),
    ("squaredcos_cap_v2", "epsilon", 20, "leading", 3, "bh2", True, (5,)),
])
def test_unipc_vs_diffusers(schedule, pred, n, spacing, order, variant, lof, disable):
    check_unipc(schedule, pred, n, spacing, order, variant, lof, disable).check()


@pytest.mark.parametrize("schedule,pred,n,spacing,order,lof", [
    ("linear", "epsilon", 8, "linspace", 3, True),  # N < 15: lower_order_final acts
    ("scaled_linear", "v_prediction", 20, "leading", 2, True),
    ("squaredcos_cap_v2", "sample", 50, "leading", 3, True),
    ("linear", "v_prediction", 20, "trailing", 1, True),
    ("scaled_linear", "epsilon", 8, "trailing", 2, False),
    ("squaredcos_cap_v2", "epsilon", 8, "linspace", 3, False),
])
def test_deis_vs_diffusers(schedule, pred, n, spacing, order, lof):
    check_deis(schedule, pred, n, spacing, order, lof).check()


@pytest.mark.parametrize("schedule,pred,n,spacing,prk,alpha_to_one,offset", [
    ("linear", "epsilon", 20, "leading", True, False, 0),
    ("scaled_linear", "v_prediction", 50, "leading", True, True, 1),
    ("squaredcos_cap_v2", "epsilon", 10, "leading", True, False, 0),
    ("linear", "epsilon", 20, "trailing", False, True, 0),
    ("scaled_linear", "v_prediction", 8, "leading", False, False, 1),
    ("squaredcos_cap_v2", "v_prediction", 50, "leading", False, True, 0),
])
def test_pndm_vs_diffusers(schedule, pred, n, spacing, prk, alpha_to_one, offset):
    check_pndm(schedule, pred, n, spacing, prk, alpha_to_one, offset).check()


# ------------------------------------------------------------------------------------------
# Why some configurations are not compared.
# ------------------------------------------------------------------------------------------


def test_not_comparable_configurations():
    diffusers = _diffusers()
    # PNDM "linspace": the PLMS step t -> t - 1000 // N misses the next timestep
    sched = diffusers.PNDMScheduler(timestep_spacing="linspace", skip_prk_steps=True)
    sched.set_timesteps(10)
    ts = sched._timesteps[::-1]
    assert ts[0] - ts[1] == 111 and 1000 // 10 == 100
    # PRK with an odd 1000 // N: moved to t - 62, evaluated at t' + 62 = t - 63
    sched = diffusers.PNDMScheduler()
    sched.set_timesteps(8)
    prk = sched.prk_timesteps
    assert prk[0] - 1000 // 8 // 2 != prk[1]
    # dpmsolver (noise prediction) into sigma = 0 is refused
    with pytest.raises(ValueError, match="final_sigmas_type"):
        diffusers.DPMSolverSinglestepScheduler(algorithm_type="dpmsolver", final_sigmas_type="zero")
    # UniPC bh1 into sigma = 0: NaN in diffusers, x0_hat in jaxdiff
    sched = diffusers.UniPCMultistepScheduler(solver_type="bh1", solver_order=2)
    sched.set_timesteps(6)
    assert np.isnan(diffusers_loop(sched)).all()
    proc = _process("linear")
    ours = jax_sample("unipc", proc, sigma_grid(sched, proc), "epsilon", order=2, variant="bh1")
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0.1


# ------------------------------------------------------------------------------------------
# Identities, options and edge cases (no diffusers needed).
# ------------------------------------------------------------------------------------------

EDM = P.EDM()
C = 0.5


def nonlinear_denoiser(x, t):
    return jnp.tanh(1.3 * x / (1.0 + t)) * (1.0 + 0.1 * jnp.cos(x))


X = jnp.asarray([[1.0, -2.0, 0.5, 0.1], [0.3, 1.5, -1.0, 2.2]])


def test_registry_and_attributes():
    for name in NAMES:
        fn = samplers.get(name)
        assert fn is getattr(samplers, name) and name in samplers.available()
        assert fn.stochastic is False
    # ``order`` is the default ``order`` option for the three with one, the AB weights for PNDM
    assert (samplers.dpm_solver.order, samplers.unipc.order, samplers.deis.order) == (2, 2, 2)
    assert samplers.pndm.order == samplers.plms.order == 4


def test_bad_options_raise():
    grid = S.make_grid(EDM, 6)
    den = gaussian_denoiser(EDM)
    for name in ("dpm_solver", "unipc", "deis"):
        with pytest.raises(ValueError, match="order"):
            samplers.get(name)(den, X, grid, order=4)
    with pytest.raises(ValueError, match="algorithm"):
        samplers.dpm_solver(den, X, grid, algorithm="dpmsolver+")
    with pytest.raises(ValueError, match="solver_type"):
        samplers.dpm_solver(den, X, grid, solver_type="euler")
    with pytest.raises(ValueError, match="variant"):
        samplers.unipc(den, X, grid, variant="bh3")
    with pytest.raises(ValueError, match="combine"):
        samplers.plms(den, X, grid, combine="x0")
    with pytest.raises(TypeError, match="Grid"):
        samplers.pndm(den, X, {"t": grid.t})


def test_first_order_members_are_ddim_and_unip2_is_dpmpp_2m():
    """Order 1 of dpm_solver / deis and UniP-1 are DDIM; UniP-2 with B(h) = e^h - 1 and no
    corrector is DPM-Solver++(2M) (rho = 1/2 equals its 1 / (2 r) extrapolation)."""
    grid = S.make_grid(EDM, 10)  # Karras, ending at sigma = 0
    x = X * grid.sigma[0]
    run = lambda name, **kw: np.asarray(samplers.get(name)(nonlinear_denoiser, x, grid, **kw))  # noqa: E731
    # (dpm_solver and deis of order 1 against DDIM: their order-1 parity cases with diffusers)
    unip1 = run("unipc", order=1, disable_corrector=range(10))
    np.testing.assert_allclose(unip1, run("ddim"), rtol=1e-5, atol=1e-5)
    unip2 = run("unipc", order=2, disable_corrector=range(10))
    np.testing.assert_allclose(unip2, np.asarray(dpmpp_2m(nonlinear_denoiser, x, grid)), rtol=1e-5, atol=1e-5)
    # ... and the corrector does change the result
    assert np.max(np.abs(run("unipc", order=2) - unip2)) > 1e-3


def test_zero_terminal_snr_start_is_finite():
    """A grid starting at alpha = 0 (zero terminal SNR, lambda = -inf, log rho = +inf): the DDIM-form
    first-order step and the order fallbacks keep dpm_solver, unipc (bh1: its corrector there is
    skipped) and deis finite, and near the exact PF-ODE end point. (PNDM / PLMS need alpha > 0.)"""
    proc = P.discrete_vp(rescale_betas_zero_snr=True)
    grid = S.make_grid(proc, 20, "trailing")
    assert float(grid.alpha[0]) == 0.0
    x = X * grid.sigma[0]
    den = gaussian_denoiser(proc)
    exact = np.asarray(x) * C  # from N(0, 1) noise (alpha = 0) to the data scale, sigma = 0
    cases = [("dpm_solver", dict(order=3)), ("unipc", dict(order=3, variant="bh1")), ("deis", dict(order=3))]
    for name, kw in cases:
        out = np.asarray(samplers.get(name)(den, x, grid, **kw))
        assert np.isfinite(out).all(), (name, kw)
        assert rel_err(out, exact) < 0.1, (name, kw, rel_err(out, exact))


def test_dtype_jit_and_zero_length_padding():
    """Zero-length steps (a repeated last point) are exact no-ops; a bfloat16 state keeps its dtype
    (checked where the state is handled differently: PNDM / PLMS keep a float32 state inside)."""
    grid = S.grid_from_sigmas(EDM, S.karras_sigmas(7, 0.05, 80.0), final="last")  # coarse: 6 steps
    pad = S.Grid(*(jnp.concatenate([v, jnp.repeat(v[-1:], 3)]) for v in (grid.t, grid.alpha, grid.sigma)),
                 process=EDM)
    x = X * grid.sigma[0]
    for name in NAMES:
        # (lower_order_final plans depend on N, which padding changes)
        kw = dict(lower_order_final=False) if name in ("unipc", "deis") else {}
        f = jax.jit(lambda x, g, name=name, kw=kw: samplers.get(name)(nonlinear_denoiser, x, g, **kw))
        out = f(x, pad)
        if name != "plms":  # (its PLMS steps are pndm's)
            np.testing.assert_allclose(np.asarray(f(x, grid)), np.asarray(out), rtol=1e-6, atol=1e-6)
        if name in ("pndm", "plms"):
            low = f(x.astype(jnp.bfloat16), pad)
            assert low.dtype == jnp.bfloat16 and rel_err(low.astype(jnp.float32), out) < 5e-2


# ------------------------------------------------------------------------------------------
# Convergence order on Gaussian data (module docstring, part 2).
# ------------------------------------------------------------------------------------------

VP = P.VPLinear()
T_END = float(VP.t_from_sigma_ratio(0.05))
STEPS = (12, 24, 48, 96)


def _logsnr_grid(n):
    return S.grid_from_times(VP, S.logsnr_uniform_times(VP, n, T_END), final="last")


def _padded(grid, num_steps):
    k = num_steps + 1 - grid.t.shape[0]
    rep = lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], k)])  # noqa: E731
    return S.Grid(t=rep(grid.t), alpha=rep(grid.alpha), sigma=rep(grid.sigma), process=grid.process)


# (name, options, lower bound, upper bound on the fitted slope) -- see the module docstring
CONVERGENCE = [
    ("dpm_solver", dict(order=1), 0.7, 1.3),
    ("dpm_solver", dict(order=2), 1.7, 2.3),
    ("dpm_solver", dict(order=3), 2.7, 3.3),
    ("dpm_solver", dict(order=2, solver_type="heun"), 1.7, 2.3),
    ("dpm_solver", dict(order=3, algorithm="dpmsolver"), 2.7, 3.3),
    ("unipc", dict(order=1), 1.7, 2.3),
    ("unipc", dict(order=2), 2.7, 3.3),
    ("unipc", dict(order=3), 2.7, 4.3),
    ("deis", dict(order=1), 0.7, 1.3),
    ("deis", dict(order=2), 1.7, 2.3),
    ("deis", dict(order=3), 2.7, 5.0),
    ("plms", dict(), 1.7, 2.3),
    ("pndm", dict(), 1.7, 2.3),
]


@pytest.mark.parametrize("name,kw,lo,hi", CONVERGENCE, ids=lambda v: str(v))
def test_pf_ode_convergence_order(name, kw, lo, hi):
    if name in ("dpm_solver", "unipc", "deis"):
        kw = dict(kw, lower_order_final=False)
    den = gaussian_denoiser(VP)
    f = jax.jit(lambda x, g: samplers.get(name)(den, x, g, **kw))
    x_unit = jnp.asarray([[1.0, -0.5, 2.0, 0.3]])
    errs = []
    for n in STEPS:
        grid = _logsnr_grid(n)
        a0, s0, a1, s1 = (float(v) for v in (grid.alpha[0], grid.sigma[0], grid.alpha[-1], grid.sigma[-1]))
        x = x_unit * np.sqrt(a0**2 * C**2 + s0**2)
        exact = np.asarray(x, np.float64) * np.sqrt(a1**2 * C**2 + s1**2) / np.sqrt(a0**2 * C**2 + s0**2)
        out = np.asarray(f(x, _padded(grid, STEPS[-1])), np.float64)  # one compile for all N
        errs.append(np.max(np.abs(out - exact)) / np.max(np.abs(exact)))
    errs = np.asarray(errs)
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert lo <= slope <= hi, (name, kw, errs, slope)
    assert np.all(np.diff(errs) < 0), errs  # converging


# ------------------------------------------------------------------------------------------
# Sweeps (slow, --runslow): beta schedule x prediction x spacing / steps x order per scheduler.
# eps-space samplers skip squaredcos_cap_v2 from t = 999 (module docstring).
# ------------------------------------------------------------------------------------------

PREDS = ("epsilon", "v_prediction", "sample")
SPACINGS = ("linspace", "leading", "trailing")
STEP_COUNTS = (8, 20, 50)


def _sweep(*axes):
    """Every combination of ``axes``, each with every order and a step count cycling through
    STEP_COUNTS (so each order meets each step count across the sweep)."""
    combos = list(itertools.product(*axes))
    return [c + (STEP_COUNTS[(i + k) % 3], k + 1) for i, c in enumerate(combos) for k in range(3)]


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pred,solver_type,n,order", _sweep(SCHEDULE_KW, PREDS, ("midpoint", "heun")))
def test_dpm_solver_sweep(schedule, pred, solver_type, n, order):
    check_dpm_solver(schedule, pred, n, order, "dpmsolver++", solver_type).check()
    if schedule != "squaredcos_cap_v2":
        check_dpm_solver(schedule, pred, n, order, "dpmsolver", solver_type).check()


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pred,spacing,n,order", _sweep(SCHEDULE_KW, PREDS, SPACINGS))
def test_unipc_sweep(schedule, pred, spacing, n, order):
    check_unipc(schedule, pred, n, spacing, order, "bh2" if n != 20 else "bh1").check()


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pred,spacing,n,order", _sweep(SCHEDULE_KW, PREDS, SPACINGS))
def test_deis_sweep(schedule, pred, spacing, n, order):
    if schedule == "squaredcos_cap_v2" and spacing != "leading":
        pytest.skip("eps space from t = 999 on squaredcos_cap_v2 (module docstring)")
    check_deis(schedule, pred, n, spacing, order).check()


@pytest.mark.slow
@pytest.mark.parametrize("schedule,pred,spacing,prk", itertools.product(
    SCHEDULE_KW, ("epsilon", "v_prediction"), ("leading", "trailing"), (True, False)))
@pytest.mark.parametrize("n", (10, 20, 50))
def test_pndm_sweep(schedule, pred, spacing, prk, n):
    if schedule == "squaredcos_cap_v2" and spacing != "leading":
        pytest.skip("eps space from t = 999 on squaredcos_cap_v2 (module docstring)")
    check_pndm(schedule, pred, n, spacing, prk, alpha_to_one=n == 20).check()
