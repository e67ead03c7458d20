"""Pseudo numerical methods for diffusion models (Liu et al. 2022, "PNDM", ICLR): PLMS and PNDM,
as diffusers' ``PNDMScheduler``.

Both work in eps space. A step from t to t' moves x with the *transfer part* of PNDM (Eq. 9),
which is the DDIM step for a given noise estimate e,

    phi(x, e, t -> t') = alpha' (x - sigma e) / alpha + sigma' e,

and the *gradient part* chooses e:

* :func:`plms` (diffusers ``skip_prk_steps=True``): step 0 is a pseudo improved-Euler (Heun)
  step -- e at x_0, a trial transfer to t_1, e there, then the transfer of the average from x_0
  (2 model calls; the trial evaluation is not kept) -- and step i >= 1 is linear multistep
  (Adams-Bashforth) on the kept evaluations: (3 e_i - e_{i-1}) / 2, then
  (23, -16, 5) / 12, then (55, -59, 37, -9) / 24;
* :func:`pndm`: steps 0, 1, 2 are pseudo Runge-Kutta (F-PRK) with 4 model calls each --
  at t_i, twice at the midpoint, at t_{i+1} -- keeping e at t_0, t_1, t_2; step i >= 3 is PLMS with
  the 4th-order weights.

Grid. The Grid is the N + 1 full points, the same as for every other sampler; PRK's midpoints are
not on it and are computed from the process: the time midpoint (the paper's t - delta / 2), for a
discrete process rounded as diffusers does, t_mid = t - floor((t - t') / 2). (diffusers moves to
t - (T // N) // 2 and, for odd T // N, evaluates the model there at t' + (T // N) // 2, one
timestep later.) For parity with ``PNDMScheduler``: the points
``scheduler._timesteps[::-1]`` followed by the clean point (``set_alpha_to_one=True``; as
``grid_from_times(..., final="zero")``) or by t = 0, alphas_cumprod[0] (the default
``set_alpha_to_one=False``; ``final="last"`` after appending 0). diffusers always steps from t to
t - T // N, which is the next point of its own grid only for "leading" spacing and for
"trailing" when N divides T; its "linspace" plan is no grid.

A zero-length step (same alpha and sigma at both ends) is a no-op. Being eps-space methods,
PLMS / PNDM need alpha > 0 at the points they step from (not a zero-terminal-SNR start).

Orders. ``plms.order = pndm.order = 4``, the order of the Adams-Bashforth weights the paper
uses. They assume e is a polynomial in the step index while the transfer integrates it against
d(sigma / alpha), so on a general grid the global order is 2 (the weighted and unweighted means
of e over a step differ at O(h^2)); see the convergence test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.samplers.base import run_steps, validate
from jaxdiff.schedules import Grid, require_alpha_start_positive

_AB = {
    1: (1.0,),
    2: (3.0 / 2.0, -1.0 / 2.0),
    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),
    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),
}


def _transfer(x, e, a, s, a_n, s_n):
    """PNDM's transfer part (Eq. 9) = DDIM: alpha' (x - sigma e) / alpha + sigma' e."""
    return (a_n / a) * (x - s * e) + s_n * e


COMBINE = ("eps", "v")


def _out(denoise, x, t, a, s, combine, dtype):
    """The quantity the gradient part combines, at (x, t): eps_hat, or v_hat = alpha eps - sigma x0.

    ``x`` is the float32 state; the model sees it in the sampler's dtype."""
    x0 = denoise(x.astype(dtype), t).astype(jnp.float32)
    eps = (x - a * x0) / s
    return eps if combine == "eps" else a * eps - s * x0


def _to_eps(out, x, a, s, combine):
    """The noise estimate a transfer from (x, t) uses: out itself, or v converted at (x, t)."""
    return out if combine == "eps" else (s * x + a * out) / (a**2 + s**2)


def _midpoints(grid: Grid, k: int):
    """(t, alpha, sigma) of the PRK midpoints of the first k steps."""
    t0, t1 = grid.t[:k], grid.t[1 : k + 1]
    if grid.process.discrete:
        mid = t0 - jnp.floor((t0 - t1) / 2.0)
    else:
        mid = 0.5 * (t0 + t1)
    return mid, grid.process.alpha(mid).astype(jnp.float32), grid.process.sigma(mid).astype(jnp.float32)


def _warmup(denoise, x, grid: Grid, kind: str, combine: str):
    """The first steps with extra evaluations, as one scan over model calls ("stages").

    Returns (x at the end of the warm-up, history of kept e (3, ...), count kept, steps done).
    """
    n = grid.t.shape[0] - 1
    if kind == "prk":
        k = min(3, n)
        weights, targets, evals = (1 / 6, 1 / 3, 1 / 3, 1 / 6), (1, 1, 2, 2), (0, 1, 1, 2)
    else:  # improved Euler
        k = min(1, n)
        weights, targets, evals = (0.5, 0.5), (2, 2), (0, 2)
    r = len(weights)
    mt, ma, ms = _midpoints(grid, k)
    pt = jnp.stack([grid.t[:k], mt, grid.t[1 : k + 1]], axis=1)  # point kinds: 0 start, 1 mid, 2 end
    pa = jnp.stack([grid.alpha[:k], ma, grid.alpha[1 : k + 1]], axis=1)
    ps = jnp.stack([grid.sigma[:k], ms, grid.sigma[1 : k + 1]], axis=1)
    stage = np.arange(k * r)
    j, q = stage // r, stage % r
    xs = dict(j=jnp.asarray(j), q=jnp.asarray(q), w=jnp.asarray(np.asarray(weights, np.float32)[q]),
              ev=jnp.asarray(np.asarray(evals)[q]), tg=jnp.asarray(np.asarray(targets)[q]))
    dtype = x.dtype

    def body(c, st):
        x_j, x_ev, acc, hist = c
        jj = st["j"]
        e = _out(denoise, x_ev, pt[jj, st["ev"]], pa[jj, st["ev"]], ps[jj, st["ev"]], combine, dtype)
        first, last = st["q"] == 0, st["q"] == r - 1
        acc = jnp.where(first, 0.0, acc) + st["w"] * e
        e_use = _to_eps(jnp.where(last, acc, e), x_j, pa[jj, 0], ps[jj, 0], combine)
        x_new = _transfer(x_j, e_use, pa[jj, 0], ps[jj, 0], pa[jj, st["tg"]], ps[jj, st["tg"]])
        hist = jnp.where(first, jnp.stack([e, hist[0], hist[1]]), hist)
        x_j = jnp.where(last, x_new, x_j)
        return (x_j, x_new, acc, hist), None

    xf = x.astype(jnp.float32)
    zeros = jnp.zeros(x.shape, jnp.float32)
    init = (xf, xf, zeros, jnp.zeros((3,) + x.shape, jnp.float32))
    (x_j, _, _, hist), _ = jax.lax.scan(body, init, xs)
    return x_j, hist, k


def _plms_tail(denoise, x_j, hist, count, grid: Grid, start: int, dtype, combine: str):
    """Linear multistep steps start .. N-1, history (e_{i-1}, e_{i-2}, e_{i-3})."""
    n = grid.t.shape[0] - 1
    if start >= n:
        return x_j.astype(dtype)
    tail = Grid(t=grid.t[start:], alpha=grid.alpha[start:], sigma=grid.sigma[start:], process=grid.process)

    def step(carry, s):
        x, hist, cnt = carry
        e = _out(denoise, x, s.t, s.alpha, s.sigma, combine, dtype)
        hs = [e, hist[0], hist[1], hist[2]]
        mixes = [sum(w * hs[m] for m, w in enumerate(_AB[k])) for k in (1, 2, 3, 4)]
        order = jnp.minimum(cnt + 1, 4)
        e_use = jnp.select([order == k for k in (1, 2, 3)], mixes[:3], mixes[3])
        e_use = _to_eps(e_use, x, s.alpha, s.sigma, combine)
        x_next = _transfer(x, e_use, s.alpha, s.sigma, s.alpha_next, s.sigma_next)
        new = (x_next, jnp.stack([e, hist[0], hist[1]]), jnp.minimum(cnt + 1, 3))
        skip = (s.alpha_next == s.alpha) & (s.sigma_next == s.sigma)  # zero-length step: a no-op
        return jax.tree_util.tree_map(lambda a, b: jnp.where(skip, a, b), carry, new)

    x_end, _, _ = run_steps(step, (x_j.astype(jnp.float32), hist, jnp.asarray(count, jnp.int32)), tail)
    return x_end.astype(dtype)


def _check_combine(name, combine):
    if combine not in COMBINE:
        raise ValueError(f"{name}: combine must be one of {', '.join(COMBINE)}, got {combine!r}")


def plms(denoise, x, grid, *, key=None, combine: str = "eps"):
    """PLMS (Liu et al. 2022; a pseudo improved-Euler first step, then pseudo linear multistep):
    diffusers' ``PNDMScheduler(skip_prk_steps=True)``. N steps cost N + 1 model calls.

    ``combine``: what the gradient part averages -- ``"eps"`` (the paper) or ``"v"`` (what
    diffusers does for a v-prediction model: it combines the raw outputs v_hat and converts the
    mix to eps at the step's start point, eps = (sigma x + alpha v) / (alpha^2 + sigma^2)).
    See the module docstring.
    """
    # One step would evaluate the model's trial point at the grid's end, sigma = 0, where its
    # eps = (x - alpha x0_hat) / sigma is 0/0: at least 2 steps.
    validate("plms", x, grid, key, stochastic=False, min_steps=2)
    require_alpha_start_positive("plms", grid, "its eps-space steps divide by alpha")
    _check_combine("plms", combine)
    x_j, hist, k = _warmup(denoise, x, grid, "euler", combine)
    return _plms_tail(denoise, x_j, hist, 1, grid, k, x.dtype, combine)


def pndm(denoise, x, grid, *, key=None, combine: str = "eps"):
    """PNDM (Liu et al. 2022): 3 pseudo Runge-Kutta steps (F-PRK; 12 model calls), then
    PLMS; diffusers' ``PNDMScheduler`` with PRK steps. N steps cost N + 9 model calls.
    ``combine`` as for :func:`plms` (the PRK stages use it too)."""
    # Its 3 pseudo Runge-Kutta steps need a PLMS tail: N = 3 gives NaN and N = 4 a wrong result
    # (std 4.5 vs PLMS 0.065 on a smooth toy denoiser); N = 5 agrees with PLMS (0.056 vs 0.052).
    validate("pndm", x, grid, key, stochastic=False, min_steps=5)
    require_alpha_start_positive("pndm", grid, "its eps-space steps divide by alpha")
    _check_combine("pndm", combine)
    x_j, hist, k = _warmup(denoise, x, grid, "prk", combine)
    return _plms_tail(denoise, x_j, hist, k, grid, k, x.dtype, combine)


plms.order = 4
plms.stochastic = False
pndm.order = 4
pndm.stochastic = False

__all__ = ["plms", "pndm"]
