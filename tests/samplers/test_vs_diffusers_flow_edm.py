"""Parity with diffusers' flow-matching and EDM schedulers.

* ``FlowMatchEulerDiscreteScheduler`` / ``FlowMatchHeunDiscreteScheduler`` (Esser et al. 2024, SD3;
  ``use_dynamic_shifting=False``, with and without the ``shift`` option) against jaxdiff's
  Euler / Heun on :class:`~jaxdiff.processes.RectifiedFlow` (x_t = (1 - t) x0 + t eps; diffusers'
  sigma is t) -- both the general ``euler`` / ``heun`` and the velocity-form ``flow_euler`` /
  ``flow_heun``, whichever are registered. The grid is :func:`jaxdiff.samplers.api.flow_match_grid`
  (built by jaxdiff, not read from the scheduler), the network a velocity model
  v(x, timestep = 1000 t), made a denoiser by ``make_denoiser(net, RectifiedFlow(), "velocity")``.
* ``EDMEulerScheduler`` (Karras et al. 2022, Algorithm 2 without churn = Euler on the Karras
  grid, Eq. 5 with rho = 7) against jaxdiff's ``euler`` on :class:`~jaxdiff.processes.EDM` with
  ``make_grid(..., "karras")``, the network wrapped by EDM preconditioning (Table 1: c_in, c_noise
  = ln(sigma) / 4, c_skip, c_out; ``make_denoiser(..., "edm")``). diffusers' "v_prediction" EDM
  convention flips the sign of c_out, i.e. the same denoiser with the network's output negated.

Same network in torch and jax, same start point; the final samples agree to 1e-4 relative
(max |a - b| / max |b|).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import parameterization as PZ  # noqa: E402
from jaxdiff import processes as P  # noqa: E402
from jaxdiff import samplers  # noqa: E402
from jaxdiff import schedules as S  # noqa: E402
from jaxdiff.samplers import api  # noqa: E402

TOL = 1e-4
SHAPE = (2, 3, 4, 4)
RNG = np.random.default_rng(5)
NOISE = RNG.standard_normal(SHAPE).astype(np.float32)
W = (0.5 * RNG.standard_normal((3, 3))).astype(np.float32)


def torch_net(x, c):
    mix = torch.einsum("ij,bjhw->bihw", torch.from_numpy(W).to(x.dtype), x)
    return 0.9 * torch.tanh(0.5 * (x + 0.2 * mix) + 0.3 * float(c))


def jax_net(x, c):  # c: (batch,), the network's time input
    mix = jnp.einsum("ij,bjhw->bihw", jnp.asarray(W), x)
    return 0.9 * jnp.tanh(0.5 * (x + 0.2 * mix) + 0.3 * jnp.reshape(c, (-1, 1, 1, 1)))


def rel_err(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def registered(*names):
    have = [n for n in names if n in samplers.available()]
    assert have, names
    return have


def diffusers_run(sched, n, x, net):
    sched.set_timesteps(n)
    x = torch.from_numpy(np.asarray(x, np.float32).copy())
    calls = 0
    for t in sched.timesteps:
        scaled = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x  # (FlowMatch: none)
        out = net(scaled, t)
        calls += 1
        x = sched.step(out, t, x).prev_sample
    return x.numpy(), calls


# ------------------------------------------------------------------------------------------
# Flow matching (rectified flow).
# ------------------------------------------------------------------------------------------

RF = P.RectifiedFlow()


def flow_torch_net(x, t):  # velocity model: t is diffusers' timestep (0 .. 1000)
    return torch_net(x, 1e-3 * float(t)) - 0.5 * x


def flow_jax_net(x, t):
    return jax_net(x, 1e-3 * t) - 0.5 * x


def flow_ours(name, n, shift):
    sg = api.flow_match_grid(n, shift=shift)
    den = PZ.make_denoiser(flow_jax_net, RF, "velocity")  # RF.net_time(t) = 1000 t, diffusers' timestep
    fn = jax.jit(lambda x: samplers.get(name)(den, x, sg.grid))
    return np.asarray(fn(jnp.asarray(NOISE))), sg


@pytest.mark.parametrize("n,shift", [(10, 1.0), (7, 3.0)])
def test_flow_match_euler(n, shift):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    theirs, calls = diffusers_run(sched, n, NOISE, flow_torch_net)
    assert calls == n
    for name in registered("flow_euler", "euler"):
        ours, sg = flow_ours(name, n, shift)
        np.testing.assert_allclose(np.asarray(sg.grid.t), sched.sigmas.numpy(), rtol=1e-6, atol=0)  # the grid
        assert rel_err(ours, theirs) < TOL, (name, rel_err(ours, theirs))


@pytest.mark.parametrize("n,shift", [(8, 1.0), (6, 3.0)])
def test_flow_match_heun(n, shift):
    sched = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    theirs, calls = diffusers_run(sched, n, NOISE, flow_torch_net)
    assert calls == 2 * n - 1  # N - 1 Heun steps and an Euler step into t = 0
    for name in registered("flow_heun", "heun"):
        ours, _ = flow_ours(name, n, shift)
        assert rel_err(ours, theirs) < TOL, (name, rel_err(ours, theirs))


def test_shift_times_and_grid():
    """The SD3 shift t' = s t / (1 + (s - 1) t): fixes 0 and 1, is monotone, moves mass to t = 1,
    and shift = 1 is the identity; the grid starts at t = 1 (alpha = 0), ends at the clean point."""
    t = np.linspace(0, 1, 11)
    np.testing.assert_allclose(api.shift_times(t, 1.0), t)
    s3 = api.shift_times(t, 3.0)
    assert s3[0] == 0 and s3[-1] == 1 and np.all(np.diff(s3) > 0) and np.all(s3[1:-1] > t[1:-1])
    np.testing.assert_allclose(api.shift_times(s3, 1 / 3.0), t, atol=1e-12)  # inverse shift
    g = api.flow_match_grid(5, shift=3.0).grid
    assert float(g.t[0]) == 1.0 and float(g.alpha[0]) == 0.0 and float(g.sigma[-1]) == 0.0 and g.num_steps == 5
    with pytest.raises(ValueError, match="shift"):
        api.shift_times(t, 0.0)
    # the shift changes the result (so the parity cases above test it)
    a, _ = flow_ours("euler", 7, 1.0)
    b, _ = flow_ours("euler", 7, 3.0)
    assert rel_err(a, b) > 1e-3


# ------------------------------------------------------------------------------------------
# EDM.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pred,sigma_data,n,smin,smax", [
    ("epsilon", 0.5, 10, 0.002, 80.0),
    ("v_prediction", 1.0, 7, 0.02, 20.0),
])
def test_edm_euler(pred, sigma_data, n, smin, smax):
    sched = diffusers.EDMEulerScheduler(sigma_min=smin, sigma_max=smax, sigma_data=sigma_data, prediction_type=pred)
    x_start = NOISE * float(sched.init_noise_sigma)  # diffusers' start: noise * sqrt(sigma_max^2 + 1)
    theirs, calls = diffusers_run(sched, n, x_start, torch_net)  # scale_model_input applies c_in
    assert calls == n
    proc = P.EDM(sigma_min=smin, sigma_max=smax, sigma_data=sigma_data)
    grid = S.make_grid(proc, n, "karras")
    np.testing.assert_allclose(np.asarray(grid.sigma), sched.sigmas.numpy(), rtol=2e-6)
    sign = 1.0 if pred == "epsilon" else -1.0  # diffusers' v_prediction EDM: c_out -> -c_out
    den = PZ.make_denoiser(lambda x, c: sign * jax_net(x, c), proc, "edm", sigma_data=sigma_data)
    ours = np.asarray(jax.jit(lambda x: samplers.get("euler")(den, x, grid))(jnp.asarray(x_start)))
    assert rel_err(ours, theirs) < TOL, rel_err(ours, theirs)
