"""Parity with k-diffusion's samplers (``k_diffusion/sampling.py``, k-diffusion 0.1.1.post1).

The same deterministic "network" (a smooth nonlinear function of (x, sigma), written identically in
torch and jax), the same Karras sigmas (``get_sigmas_karras``, sigma 0.002 .. 80, N = 5, 10, 25;
k-diffusion appends a 0, jaxdiff's ``grid_from_sigmas(EDM(), sigmas)`` its clean point), the same
initial noise and, for the stochastic samplers, the same injected noise: k-diffusion's sampler in
torch float32 against jaxdiff's on the EDM process. Final samples agree to 1e-4 relative
(max |a - b| / max |b|); measured ~1e-6.

Injected noise: jaxdiff draws ``jax.random.normal(step_key, x.shape, float32)`` with
``step_key = jax.random.split(key, N)[i]`` (``dpmpp_sde``: the two halves of
``jax.random.split(step_key)``, the first for the substep); the test precomputes these draws and
hands them, in order, to k-diffusion's ``noise_sampler`` (which replaces the Brownian tree of the
SDE samplers). ``sample_dpm_2``'s churn noise comes from ``torch.randn_like``, patched likewise.

k-diffusion is imported without running its package ``__init__`` (which imports torchvision,
clean-fid, wandb, ...): ``sampling.py`` and ``utils.py`` are loaded from the installed package as
modules of a private package, with a stub for the torchvision import of ``utils.py`` (unused by
the samplers) when torchvision is absent. Its own requirements pull torchvision and CUDA wheels,
so it is not in the ``test`` extra; install it with ``pip install --no-deps k-diffusion==0.1.1.post1
torchsde torchdiffeq trampoline``. The tests skip when it is not installed.

iPNDM / iPNDM_v are not in k-diffusion 0.1.1 (ComfyUI's copy of k-diffusion has them, from
zju-pi/diff-sampler); they are compared with a float64 numpy transcription of that algorithm.
"""

import importlib.util
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff import samplers
from jaxdiff import schedules as S

TOL = 1e-4
C2 = 0.25
SHAPE = (2, 3, 4, 4)
NOISE = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
KEY = jax.random.key(3, impl="rbg")  # the samplers only split it and draw; rbg compiles fast on CPU
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEPS = (5, 25)  # each sampler's defaults; its option variants at N = 10 (compile time)


def _load_kdiffusion():
    """k_diffusion.sampling (and .utils) loaded from the installed files, or None."""
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, ("k-diffusion is not installed "
                      "(pip install --no-deps k-diffusion==0.1.1.post1 torchsde torchdiffeq trampoline)")
    root = Path(list(spec.submodule_search_locations)[0])
    name = "_jaxdiff_test_kdiffusion"
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root)]
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        for mod in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
            stubs[mod] = types.ModuleType(mod)
        stubs["torchvision"].transforms = stubs["torchvision.transforms"]
        stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    saved = {m: sys.modules.get(m) for m in stubs}
    sys.modules.update(stubs)
    sys.modules[name] = pkg
    try:
        for sub in ("utils", "sampling"):
            s = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
            mod = importlib.util.module_from_spec(s)
            sys.modules[s.name] = mod
            s.loader.exec_module(mod)
            setattr(pkg, sub, mod)
        return pkg.sampling, None
    except Exception as e:  # noqa: BLE001 -- any import failure means: no reference here
        return None, f"could not load k_diffusion/sampling.py: {type(e).__name__}: {e}"
    finally:
        for m, old in saved.items():
            if old is None:
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = old


@pytest.fixture(scope="module")
def kd():
    pytest.importorskip("torch")
    sampling, why = _load_kdiffusion()
    if sampling is None:
        pytest.skip(why)
    return sampling


def torch_model(x, sigma):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    import torch

    return x * C2 / (C2 + s**2) + 0.1 * torch.tanh(x) * s / (1 + s)


def jax_model(x, t):  # EDM: t = sigma
    return x * C2 / (C2 + t**2) + 0.1 * jnp.tanh(x) * t / (1 + t)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_jaxdiff(name, x, grid, per_step=0, **kw):
    """jaxdiff's sample and, in the same compiled call, the normals its steps draw (in the order
    k-diffusion asks for them): ``normal(split(key, N)[i])``, or for two per step the normals of
    ``split(split(key, N)[i])``."""

    def f(x, g, k):
        out = samplers.get(name)(jax_model, x, g, key=k, **kw)
        keys = jax.random.split(k, g.num_steps)
        if per_step == 2:
            keys = jax.lax.map(jax.random.split, keys).reshape(-1)
        # lax.map, not vmap: rbg keys draw other bits under vmap (the sampler's scan draws per key)
        normal = lambda kk: jax.random.normal(kk, SHAPE, jnp.float32)  # noqa: E731
        return out, (jax.lax.map(normal, keys) if per_step else None)

    out, draws = jax.jit(f, compiler_options=FAST)(jnp.asarray(x), grid, KEY)
    return np.asarray(out), (list(np.array(draws)) if per_step else None)


# (jaxdiff sampler, its options, k-diffusion sampler, its options, normals drawn per step)
CASES = [
    ("euler_ancestral", {}, "sample_euler_ancestral", {}, 1),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, "sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9}, 1),
    ("dpm2", {}, "sample_dpm_2", {}, 0),
    ("dpm2_ancestral", {}, "sample_dpm_2_ancestral", {}, 1),
    ("dpm2_ancestral", {"eta": 0.7, "s_noise": 1.1}, "sample_dpm_2_ancestral",
     {"eta": 0.7, "s_noise": 1.1}, 1),
    ("dpmpp_2s_ancestral", {}, "sample_dpmpp_2s_ancestral", {}, 1),
    ("dpmpp_sde", {}, "sample_dpmpp_sde", {}, 2),
    ("dpmpp_sde", {"eta": 0.6, "r": 0.3}, "sample_dpmpp_sde", {"eta": 0.6, "r": 0.3}, 2),
    ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}, 1),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.6}, "sample_dpmpp_2m_sde",
     {"solver_type": "heun", "eta": 0.6}, 1),
    ("dpmpp_3m_sde", {}, "sample_dpmpp_3m_sde", {}, 1),
    ("dpmpp_3m_sde", {"eta": 0.4, "s_noise": 0.8}, "sample_dpmpp_3m_sde", {"eta": 0.4, "s_noise": 0.8}, 1),
    ("dpmpp_3m", {}, "sample_dpmpp_3m_sde", {"eta": 0.0}, 1),
    ("lms", {}, "sample_lms", {}, 0),
]
# Each sampler with its default options at N = 5 and 25; the option variants at N = 10.
PARAMS = [(c, n) for c in CASES for n in (STEPS if not c[1] else (10,))]
PARAMS.append((("dpmpp_2m", {}, "sample_dpmpp_2m", {}, 0), 10))  # jaxdiff's existing sampler, here too


@pytest.mark.parametrize("case,n", PARAMS, ids=[f"{c[0]}{c[1] or ''}-N{n}" for c, n in PARAMS])
def test_matches_kdiffusion(kd, case, n):
    import torch

    name, kw, kd_name, kd_kw, per_step = case
    sigmas = kd.get_sigmas_karras(n, 0.002, 80.0)  # float32, with the appended 0
    x0 = NOISE * float(sigmas[0])
    grid = S.grid_from_sigmas(P.EDM(), sigmas[:-1].numpy())
    out, draws = run_jaxdiff(name, x0, grid, per_step, **kw)
    draws = iter(draws or [])
    calls = []

    def noise_sampler(sigma, sigma_next):
        calls.append(1)
        return torch.from_numpy(next(draws))

    extra = {"noise_sampler": noise_sampler} if per_step else {}
    ref = getattr(kd, kd_name)(torch_model, torch.from_numpy(x0), sigmas, disable=True, **kd_kw, **extra).numpy()
    if per_step and kd_kw.get("eta", 1.0) != 0:
        assert len(calls) == per_step * (n - 1)  # every non-final step drew, so the noises lined up
    assert np.all(np.isfinite(ref))
    assert rel(out, ref) < TOL, rel(out, ref)


def test_dpm2_churn_matches_kdiffusion(kd, monkeypatch):
    """EDM's churn in ``sample_dpm_2``: k-diffusion draws ``torch.randn_like(x)`` every step (used
    where sigma is in [s_tmin, s_tmax]); jaxdiff draws one normal from each step key."""
    import torch

    n = 10
    sigmas = kd.get_sigmas_karras(n, 0.002, 80.0)
    x0 = NOISE * float(sigmas[0])
    grid = S.grid_from_sigmas(P.EDM(), sigmas[:-1].numpy())
    kw = {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 10.0, "s_noise": 1.003}
    out, draws = run_jaxdiff("dpm2", x0, grid, 1, **kw)
    draws = iter(draws)
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.from_numpy(next(draws)))
    ref = kd.sample_dpm_2(torch_model, torch.from_numpy(x0), sigmas, disable=True, **kw).numpy()
    assert rel(out, ref) < TOL, rel(out, ref)
    assert rel(run_jaxdiff("dpm2", x0, grid)[0], ref) > 1e-2  # the churn mattered


# ------------------------------------------------------------------------------------------
# iPNDM / iPNDM_v (zju-pi/diff-sampler, as in ComfyUI's k-diffusion): float64 transcription.
# ------------------------------------------------------------------------------------------


def _ipndm_weights(order, hs, variable):
    """Weights of d_i, d_{i-1}, ... for the step of length hs[0] = s' - s, with hs[1:] the previous
    steps (s_i - s_{i-1}, ...): fixed Adams-Bashforth, or zju-pi's variable-step iPNDM_v."""
    if not variable or order == 1:
        return {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}[order]
    h, h1 = hs[0], hs[1]
    if order == 2:
        return [(2 + h / h1) / 2, -(h / h1) / 2]
    h2 = hs[2]
    t1 = (1 - h**2 / (3 * h1 * (h1 + h2))) / 2
    if order == 3:
        return [(2 + h / h1) / 2 + t1, -(h / h1) / 2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = hs[3]
    t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
        * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
    g = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [(2 + h / h1) / 2 + t1 + t2,
            -(h / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + g) * t2,
            t1 * h1 / h2 + (h1 / h2 + g * (1 + h2 / h3)) * t2,
            -t2 * g * h1 / h2]


def _ipndm_reference(x, sigmas, max_order, variable):
    """The iPNDM loop in the VE frame, float64: order min(i + 1, max_order); into sigma = 0: x0_hat."""
    ds = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = x * C2 / (C2 + s**2) + 0.1 * np.tanh(x) * s / (1 + s)
        d = (x - den) / s
        ds.insert(0, d)
        order = min(max_order, i + 1)
        if s_next == 0:
            x = den
        else:
            hs = [s_next - s] + [sigmas[i - j] - sigmas[i - j - 1] for j in range(order - 1)]
            w = _ipndm_weights(order, hs, variable)
            x = x + (s_next - s) * sum(wj * dj for wj, dj in zip(w, ds))
        ds = ds[: max_order - 1]
    return x


@pytest.mark.parametrize("name,max_order,grids", [
    ("ipndm", 4, ((6, "zero"),)),
    ("ipndm_v", 4, ((6, "zero"), (12, "last"))),
    ("ipndm_v", 3, ((12, "last"),)),
])
def test_ipndm_matches_transcription(name, max_order, grids):
    for n, final in grids:
        sig = S.karras_sigmas(n, 0.002, 80.0)
        grid = S.grid_from_sigmas(P.EDM(), sig, final=final)
        x0 = NOISE * 80.0
        ref = _ipndm_reference(x0.astype(np.float64), np.asarray(grid.sigma, np.float64), max_order, name == "ipndm_v")
        out, _ = run_jaxdiff(name, x0, grid, max_order=max_order)
        assert rel(out, ref) < TOL, (n, final, rel(out, ref))
