"""ddpm's fixed_large and learned_range variances (iDDPM) against diffusers' DDPMScheduler with
``variance_type="fixed_large"`` / ``"learned_range"``: the same 2C-output "network" (prediction,
then the variance interpolation v), the same initial and injected noise, diffusers' loop in
torch float32 and float64 (module docstring of test_vs_diffusers)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff.samplers import api  # noqa: E402
from tests.samplers.test_vs_diffusers import SCHEDULE_KW, process_for, rel_err, to_float64  # noqa: E402

SHAPE = (2, 4, 4, 3)  # NHWC: jaxdiff splits prediction and variance on the last axis
RNG = np.random.default_rng(3)
NOISE = RNG.standard_normal(SHAPE).astype(np.float32)
W = (0.5 * RNG.standard_normal((3, 6))).astype(np.float32)


def jax_net(x, t):
    h = jnp.einsum("bhwc,cd->bhwd", x, jnp.asarray(W))
    tt = 1e-3 * jnp.reshape(t, (-1, 1, 1, 1))
    return jnp.concatenate([0.9 * jnp.tanh(0.5 * x + 0.1 * h[..., :3] + tt),  # x0
                            jnp.tanh(h[..., 3:] - 2 * tt)], -1)  # v, spanning [-1, 1] over the chain


def torch_net(x, t):  # NCHW
    h = torch.einsum("bchw,cd->bdhw", x, torch.from_numpy(W).to(x.dtype))
    tt = 1e-3 * float(t)
    return torch.cat([0.9 * torch.tanh(0.5 * x + 0.1 * h[:, :3] + tt), torch.tanh(h[:, 3:] - 2 * tt)], 1)


def jax_x0_net(x, t):
    return jax_net(x, t)[..., :3]


def diffusers_loop(sched, noise, monkeypatch, dtype):
    import diffusers.schedulers.scheduling_ddpm as mod

    state = {"i": 0}
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: noise[state["i"]].to(dtype))
    x = torch.from_numpy(NOISE.transpose(0, 3, 1, 2).copy()).to(dtype)
    for i, t in enumerate(sched.timesteps):
        state["i"] = i
        out = torch_net(x, t)
        x = sched.step(out if sched.config.variance_type == "learned_range" else out[:, :3], t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variance", ["learned_range", "fixed_large"])
@pytest.mark.parametrize("schedule,n,spacing", [("linear", 10, "leading"), ("squaredcos_cap_v2", 25, "linspace"),
                                                ("linear", 1000, "leading")])
def test_ddpm_variance_equals_diffusers(variance, schedule, n, spacing, monkeypatch):
    # x0-prediction with a bounded "network": the samples stay O(1), so the injected noise is visible
    cfg = dict(beta_schedule=schedule, variance_type=variance, clip_sample=False, timestep_spacing=spacing,
               prediction_type="sample", **SCHEDULE_KW[schedule])

    def make(**over):
        sched = diffusers.DDPMScheduler(**{**cfg, **over})
        sched.set_timesteps(n)
        return sched

    key = jax.random.key(9, impl="rbg")
    noise = [torch.from_numpy(np.asarray(jax.random.normal(k, SHAPE, jnp.float32)).transpose(0, 3, 1, 2).copy())
             for k in jax.random.split(key, n)]
    theirs = diffusers_loop(make(), noise, monkeypatch, torch.float32)
    ref64 = diffusers_loop(to_float64(make(), process_for(schedule)), noise, monkeypatch, torch.float64)
    fixed_small = diffusers_loop(make(variance_type="fixed_small"), noise, monkeypatch, torch.float32)
    ours = np.asarray(api.sample("ddpm", jax_net if variance == "learned_range" else jax_x0_net, NOISE, cfg, n,
                                 key=key))
    assert rel_err(ours, ref64) < 1e-4
    assert rel_err(ours, theirs) < 1e-4 + 2 * rel_err(theirs, ref64)
    assert np.max(np.abs(fixed_small - ref64)) > 100 * np.max(np.abs(ours - ref64))  # the variance matters here


def test_variance_type_errors():
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="option of the ddpm sampler"):
        api.sample("ddim", jax_net, x, {"beta_schedule": "linear", "variance_type": "learned_range"}, 5)
    with pytest.raises(ValueError, match="not supported"):
        api.sample("ddpm", jax_net, x, {"beta_schedule": "linear", "variance_type": "learned"}, 5,
                   key=jax.random.key(0))
    with pytest.raises(ValueError, match="adds noise on that last step"):
        api.sample("ddpm", jax_net, x, {"beta_schedule": "linear", "variance_type": "fixed_large",
                                        "timestep_spacing": "trailing"}, 25, key=jax.random.key(0))
    with pytest.raises(ValueError, match="2 x 3 output channels"):
        api.sample("ddpm", lambda x, t: x, x, {"beta_schedule": "linear", "variance_type": "learned_range"}, 5,
                   key=jax.random.key(0))


def test_grad_through_ddpm_with_learned_variances_is_finite():
    from jaxdiff import processes as P
    from jaxdiff import samplers
    from jaxdiff import schedules as S

    proc = P.discrete_vp("linear")
    grid = S.make_grid(proc, 10)

    def loss(w):
        den = lambda x, t: (jnp.tanh(w * x), jnp.tanh(w * x - 0.5))  # noqa: E731
        out = samplers.get("ddpm")(den, jnp.asarray(NOISE), grid, key=jax.random.key(0), variance="learned_range")
        return jnp.sum(out**2)

    g = jax.grad(loss)(jnp.float32(0.7))
    assert np.isfinite(float(g)) and float(g) != 0.0
