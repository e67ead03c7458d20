"""Error vs NFE of every deterministic ODE sampler on a 2-D Gaussian mixture with an exact denoiser.

The set-up of the DPM-Solver (Lu et al. 2022, Table / Fig. 3) and UniPC (Zhao et al. 2023,
Table 1) comparisons, with the model error removed: the data is a mixture of isotropic Gaussians
in 2-D, so the posterior mean E[x0 | x_t] of ``x_t = alpha x0 + sigma eps`` is known in closed form
(per component k: E[x0 | x_t, k] = m_k + alpha c^2 / (alpha^2 c^2 + sigma^2) (x_t - alpha m_k),
weighted by the responsibilities of N(alpha m_k, (alpha^2 c^2 + sigma^2) I)), and the exact
probability-flow ODE solution (Song et al. 2021, Eq. 13, written as dx/dt = alpha'(t) x0_hat +
sigma'(t) eps_hat) is computed by scipy's DOP853 in float64 at rtol = atol = 1e-10 (checked
against rtol = 1e-8: the reference's own error is printed and written to results.md).

Process: continuous VP with linear beta (Song et al. 2021; beta 0.1 .. 20), from t = 1 to
t_end = 1e-3, on DPM-Solver's log-SNR-uniform grid ending at t_end (``final="last"``: no final jump
to sigma = 0, so every sampler is measured on the same ODE segment). Error: the mean over M
starting points (drawn from the t = 1 marginal) of the L2 distance to the exact solution.

NFE. Every denoiser call is counted at run time (a host callback inside the denoiser; a Heun /
DPM-Solver-2 step costs two calls, PNDM's warm-up twelve). For each sampler the step count N is
the largest whose measured NFE (an affine function of N, fitted from two runs) is <= the target,
as the papers do for 2nd-order singlestep methods; the table shows the measured NFE where it is
not the target. Stochastic samplers (``.stochastic = True``) are skipped; the adaptive solver
``pf_ode_adaptive`` has no step count and is run at a ladder of tolerances, reported by its
measured NFE.

Run: ``python experiments/sampler_nfe/run.py`` (about 3-4 minutes on 2 CPU cores; ``--points``,
``--quick``); writes results.md and results.png next to this file.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxdiff import processes as P  # noqa: E402
from jaxdiff import samplers  # noqa: E402
from jaxdiff import schedules as S  # noqa: E402

NFES = (5, 10, 20, 50)
LOAD_AT_START = "?"
T_END = 1e-3
PROC = P.VPLinear(beta_min=0.1, beta_max=20.0, t_min=T_END, t_max=1.0)
# the mixture: 8 modes on a ring of radius 2 with unequal weights, plus one at the centre
ANGLES = np.arange(8) * 2 * np.pi / 8
MEANS = np.concatenate([2.0 * np.stack([np.cos(ANGLES), np.sin(ANGLES)], 1), np.zeros((1, 2))])
WEIGHTS = np.asarray([1, 2, 1, 2, 1, 2, 1, 2, 2], np.float64)
WEIGHTS = WEIGHTS / WEIGHTS.sum()
C = 0.25  # component standard deviation
# extra option sets shown as their own rows (the papers' tables list the orders separately)
VARIANTS = {
    "dpm_solver": [dict(order=2), dict(order=3)],
    "unipc": [dict(order=2), dict(order=3)],
    "deis": [dict(order=2), dict(order=3)],
}
MIN_STEPS = {"pndm": 5}  # PNDM: 3 pseudo Runge-Kutta warm-up steps, then PLMS (pndm refuses N < 5)
ADAPTIVE = {"pf_ode_adaptive": [dict(rtol=r, atol=r) for r in (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3)]}


# ------------------------------------------------------------------------------------------
# Exact denoiser (jax, float32 for the samplers; numpy float64 for the reference).
# ------------------------------------------------------------------------------------------


def posterior_mean(xp, x, alpha, sigma):
    """E[x0 | x_t = x] for the mixture, in array module ``xp`` (x: (M, 2))."""
    m = xp.asarray(MEANS, dtype=x.dtype)
    v = alpha**2 * C**2 + sigma**2
    diff = x[:, None, :] - alpha * m[None]  # (M, K, 2)
    logits = xp.log(xp.asarray(WEIGHTS, dtype=x.dtype))[None] - 0.5 * xp.sum(diff**2, -1) / v
    logits = logits - xp.max(logits, axis=1, keepdims=True)
    w = xp.exp(logits)
    w = w / xp.sum(w, axis=1, keepdims=True)
    comp = m[None] + (alpha * C**2 / v) * diff
    return xp.sum(w[..., None] * comp, axis=1)


def vp_alpha_sigma_np(t):
    log_a = -0.25 * t**2 * (PROC.beta_max - PROC.beta_min) - 0.5 * t * PROC.beta_min
    a = math.exp(log_a)
    return a, math.sqrt(-math.expm1(2 * log_a)), log_a


def reference(x_start, rtol):
    """Exact PF-ODE solution from t = 1 to T_END, float64 DOP853 (scipy)."""
    from scipy.integrate import solve_ivp

    shape = x_start.shape

    def f(t, y):
        x = y.reshape(shape)
        a, s, _ = vp_alpha_sigma_np(t)
        da = a * (-0.5 * t * (PROC.beta_max - PROC.beta_min) - 0.5 * PROC.beta_min)
        ds = -a * da / s
        x0 = posterior_mean(np, x, a, s)
        eps = (x - a * x0) / s
        return (da * x0 + ds * eps).ravel()

    sol = solve_ivp(f, (1.0, T_END), x_start.astype(np.float64).ravel(), method="DOP853", rtol=rtol, atol=rtol)
    assert sol.success, sol.message
    return sol.y[:, -1].reshape(shape), sol.nfev


# ------------------------------------------------------------------------------------------
# Samplers with NFE counting.
# ------------------------------------------------------------------------------------------

_CALLS = [0]


def _count(_):
    _CALLS[0] += 1


def denoise(x, t):
    jax.debug.callback(_count, t)
    a, s = PROC.alpha(t), PROC.sigma(t)
    return posterior_mean(jnp, x, a, s)


def grid_for(n):
    return S.grid_from_times(PROC, S.logsnr_uniform_times(PROC, n, T_END), final="last")


def run(name, opts, x, n):
    fn = jax.jit(lambda x, grid: samplers.get(name)(denoise, x, grid, **opts))
    grid = grid_for(n)
    _CALLS[0] = 0
    out = fn(x, grid)
    out = jax.block_until_ready(out)
    if isinstance(out, tuple):
        out = out[0]
    return np.asarray(out, np.float64), _CALLS[0]


def label(name, opts):
    return name if not opts else f"{name} ({', '.join(f'{k}={v}' for k, v in opts.items())})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=2000, help="number of starting points")
    ap.add_argument("--quick", action="store_true", help="NFE 5 and 10 only, 500 points (smoke test)")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    import matplotlib  # noqa: F401  (the [experiments] extra: fail now, not after the runs)

    os.makedirs(args.out, exist_ok=True)
    nfes = NFES[:2] if args.quick else NFES
    m = 500 if args.quick else args.points
    t0 = time.time()
    global LOAD_AT_START
    LOAD_AT_START = ", ".join(f"{v:.1f}" for v in os.getloadavg())

    rng = np.random.default_rng(0)
    comp = rng.choice(len(WEIGHTS), size=m, p=WEIGHTS)
    x0 = MEANS[comp] + C * rng.standard_normal((m, 2))
    a1, s1, _ = vp_alpha_sigma_np(1.0)
    x_start = (a1 * x0 + s1 * rng.standard_normal((m, 2))).astype(np.float32)
    exact, ref_nfev = reference(x_start, 1e-10)
    coarse, _ = reference(x_start, 1e-8)
    ref_err = float(np.mean(np.linalg.norm(coarse - exact, axis=1)))
    print(f"reference: DOP853 rtol 1e-10, {ref_nfev} f-evals; |rtol 1e-8 - rtol 1e-10| = {ref_err:.2e}", flush=True)
    x = jnp.asarray(x_start)

    def error(out):
        return float(np.mean(np.linalg.norm(out - exact, axis=1)))

    rows, skipped, adaptive = [], [], []
    for name in samplers.available():
        fn = samplers.get(name)
        if getattr(fn, "stochastic", False):
            skipped.append(name)
            continue
        if name in ADAPTIVE:
            for opts in ADAPTIVE[name]:
                out, calls = run(name, dict(opts, return_nfe=True), x, 2)
                adaptive.append((label(name, opts), calls, error(out)))
                print(f"{label(name, opts):32s} NFE {calls:4d}  err {adaptive[-1][2]:.3e}", flush=True)
            continue
        for opts in VARIANTS.get(name, [{}]):
            cache = {}

            def cached(n):
                if n not in cache:
                    cache[n] = run(name, opts, x, n)
                return cache[n]

            # NFE(N) = a N + b, measured at two step counts (reused below when they fit a target)
            n1, n2 = max(nfes[0], MIN_STEPS.get(name, 1)), max(nfes[1], MIN_STEPS.get(name, 1) + 2)
            (_, c1), (_, c2) = cached(n1), cached(n2)
            a, b = (c2 - c1) / (n2 - n1), c1 - n1 * (c2 - c1) / (n2 - n1)
            b = int(round(b))
            cells = {}
            for target in nfes:
                n = int(math.floor((target - b) / a + 1e-9))
                if n < MIN_STEPS.get(name, 1):
                    cells[target] = None
                    continue
                out, calls = cached(n)
                err = error(out)
                cells[target] = (calls, n, err if np.isfinite(err) else float("nan"))
            rows.append((label(name, opts), f"{a:g} N + {b:g}" if b else f"{a:g} N", cells))
            print(f"{rows[-1][0]:32s} NFE = {rows[-1][1]:10s} " + "  ".join(
                f"{t}: {'-' if c is None else f'{c[2]:.2e} ({c[0]})'}" for t, c in cells.items()), flush=True)
    elapsed = time.time() - t0
    write_outputs(args.out, rows, adaptive, skipped, nfes, m, ref_err, ref_nfev, elapsed)
    print(f"done in {elapsed:.0f} s; wrote {args.out}/results.md, results.png")


def write_outputs(out_dir, rows, adaptive, skipped, nfes, m, ref_err, ref_nfev, elapsed):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [
        "# Sampler error vs NFE: 2-D Gaussian mixture, exact denoiser",
        "",
        f"Generated by `python experiments/sampler_nfe/run.py` on {time.strftime('%Y-%m-%d', time.gmtime())} "
        f"({platform.node() or 'unknown host'}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
        f"jax {jax.__version__}, {jax.default_backend()}; run time {elapsed:.0f} s with load average "
        f"{LOAD_AT_START} at the start -- other jobs shared the machine when it is above the core count).",
        "",
        f"Mean L2 error over {m} starting points of each sampler's end point against the exact PF-ODE "
        f"solution (VP linear, t = 1 -> {T_END}, log-SNR-uniform grid; reference DOP853 float64 rtol 1e-10, "
        f"{ref_nfev} evaluations, itself within {ref_err:.1e} of rtol 1e-8). Samplers run in float32, so "
        "errors near 1e-6 are round-off. A cell reads `error (NFE, N steps)` where the measured NFE is not "
        "the target; `-` where even the fewest steps the sampler takes (1; 5 for PNDM, whose warm-up is 3 "
        "pseudo Runge-Kutta steps followed by PLMS) cost more than the target.",
        "",
        "| sampler | NFE(N) | " + " | ".join(f"NFE {t}" for t in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    for lab, form, cells in rows:
        out = []
        for t in nfes:
            c = cells[t]
            if c is None:
                out.append("-")
            else:
                calls, n, err = c
                out.append(f"{err:.2e}" + ("" if calls == t else f" ({calls}, N={n})"))
        lines.append(f"| {lab} | {form} | " + " | ".join(out) + " |")
    if adaptive:
        lines += ["", "Adaptive step size (error control instead of a step count; NFE measured):", "",
                  "| sampler | NFE | error |", "|---|---|---|"]
        lines += [f"| {lab} | {calls} | {err:.2e} |" for lab, calls, err in adaptive]
    lines += ["", f"Skipped (stochastic, `.stochastic = True`; no deterministic ODE solution to compare with): "
              f"{', '.join(skipped) if skipped else 'none'}.", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))

    fig, ax = plt.subplots(figsize=(9, 6.5))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>phx*+"
    for i, (lab, _, cells) in enumerate(rows):
        pts = sorted((c[0], c[2]) for c in cells.values() if c is not None and np.isfinite(c[2]))
        if pts:
            ax.plot(*zip(*pts), marker=markers[i % len(markers)], color=cmap(i % 20), label=lab, lw=1.2, ms=4)
    if adaptive:  # in tolerance order (several tolerances can cost the same NFE)
        pts = [(c, e) for _, c, e in adaptive if np.isfinite(e)]
        ax.plot(*zip(*pts), "k:", marker="*", ms=8, label="pf_ode_adaptive (rtol = atol 0.3 .. 1e-3)", lw=1.0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(list(nfes))
    ax.set_xticklabels([str(t) for t in nfes])
    ax.set_xlabel("NFE (measured denoiser calls)")
    ax.set_ylabel("mean L2 error vs exact PF-ODE solution")
    ax.set_title("2-D Gaussian mixture, VP linear, log-SNR grid, t = 1 -> 1e-3")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "results.png"), dpi=110)


if __name__ == "__main__":
    main()
