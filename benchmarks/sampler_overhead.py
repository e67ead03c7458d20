"""Per-step overhead of jaxdiff's compiled sampling loop (a benchmark, not a test).

For a small UNet (``jaxdiff.nets.UNet``, ch 32, ch_mult (1, 2), attention at 8x8, 16x16x3,
batch 8, DDPM linear betas, epsilon prediction) and several samplers:

    overhead = wall(jitted sampler, N steps) - NFE x wall(one jitted model call)

reported in ms per step and as a percentage of NFE x the model call. NFE is counted (a host
callback in the denoiser, in a separate untimed run), so Heun-type samplers' two calls per step
are accounted for. Model-call and loop timings alternate (3 calls, 1 loop, ``--repeats`` times,
after a warm-up call of each, which compiles) so that drifting machine load hits both alike; the
medians are used. The percentage is given for wall time and for process CPU time (all threads):
on a machine shared with other jobs the CPU-time figure is the steadier one. The loop's overhead
is what the sampler adds around the network -- coefficient arithmetic, the scan, ``lax.cond``
branches, history buffers of multistep methods -- together with any difference between the
network inside the scan and the standalone call (the standalone call pays one dispatch and its own
executable launch), so negative values are possible.
A second baseline isolates the sampler's own work: the same NFE model calls in a bare
``lax.scan`` (state fed through, no sampler arithmetic) -- "vs scan" is the loop's extra time
over it.

    python benchmarks/sampler_overhead.py [--steps 20] [--repeats 5] [--samplers ddim,euler,...]

Prints the machine (CPU, cores, load average), versions, one line per sampler and a JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402

DEFAULT_SAMPLERS = "ddim,euler,heun,dpmpp_2m,dpm_solver,unipc,deis,lms,ipndm,plms"
UNET_SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
SIZE, CH, BATCH = 16, 3, 8


def timed(fn):
    """(wall s, process CPU s) of one ``fn()`` call, result blocked on."""
    import jax

    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(model_call, loop, bare, repeats):
    """Alternate model-call, loop and bare-scan timings (so machine-load drift hits all alike);
    medians of wall and CPU time for each. One warm-up call of each first (compiles)."""
    import jax

    for f in (model_call, loop, bare):
        jax.block_until_ready(f())
    m, lp, b = [], [], []
    for _ in range(repeats):
        m += [timed(model_call) for _ in range(3)]
        lp.append(timed(loop))
        b.append(timed(bare))
    med = lambda xs, i: statistics.median(v[i] for v in xs)  # noqa: E731
    return dict(model_wall=med(m, 0), model_cpu=med(m, 1), loop_wall=med(lp, 0), loop_cpu=med(lp, 1),
                bare_wall=med(b, 0), bare_cpu=med(b, 1), loop_walls=[round(v[0], 4) for v in lp])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--samplers", default=DEFAULT_SAMPLERS)
    ap.add_argument("--json", default=None, help="append the JSON result line to this file")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxdiff import compile_options
    from jaxdiff import parameterization as PZ
    from jaxdiff import processes as P
    from jaxdiff import samplers
    from jaxdiff import schedules as S
    from jaxdiff.nets import UNet

    info = common.machine_info()
    common.log(f"machine: {info}")
    model = UNet(**UNET_SMALL)
    x = jax.random.normal(jax.random.key(0), (BATCH, SIZE, SIZE, CH))
    params = model.init(jax.random.key(1), x, jnp.zeros((BATCH,)))["params"]
    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    net = lambda p, x, t: model.apply({"params": p}, x, t)  # noqa: E731

    t_in = jnp.full((BATCH,), 500.0)
    call = compile_options.jit(net)
    model_call = lambda: call(params, x, t_in)  # noqa: E731
    common.log(f"UNet {n_params:,} params, batch {BATCH}, {SIZE}x{SIZE}x{CH}")

    proc = P.discrete_vp("linear")
    grid = S.make_grid(proc, args.steps)  # diffusers "linspace" timesteps, ending at sigma = 0
    results = []
    print(f"{'sampler':12s} {'NFE':>4s} {'call ms':>8s} {'loop ms':>9s} {'ovh ms/step':>12s} {'ovh % wall':>10s} "
          f"{'ovh % CPU':>10s} {'bare scan ms':>12s} {'vs scan % wall':>14s} {'vs scan % CPU':>13s}")
    for name in args.samplers.split(","):
        fn = samplers.get(name)
        key = jax.random.key(2) if fn.stochastic else None
        calls = [0]

        def counted(x, t):
            jax.debug.callback(lambda _: calls.__setitem__(0, calls[0] + 1), t)
            return x

        def make(den):
            return compile_options.jit(lambda p, x, g: fn(den(p), x, g, key=key))

        # NFE: an untimed run with a counting denoiser
        counting = make(lambda p: PZ.make_denoiser(lambda x, t: counted(net(p, x, t), t), proc, "epsilon"))
        jax.block_until_ready(counting(params, x, grid))
        nfe = calls[0]
        loop = make(lambda p: PZ.make_denoiser(lambda x, t: net(p, x, t), proc, "epsilon"))
        # the same NFE model calls in a bare lax.scan (state fed through, no sampler arithmetic)
        bare = compile_options.jit(lambda p, x, ts: jax.lax.scan(lambda c, t: (net(p, c, jnp.full((BATCH,), t)), None), x, ts)[0])
        ts = jnp.linspace(999.0, 0.0, nfe)
        r = interleaved(model_call, lambda: loop(params, x, grid), lambda: bare(params, x, ts), args.repeats)
        over_wall = r["loop_wall"] - nfe * r["model_wall"]
        over_cpu = r["loop_cpu"] - nfe * r["model_cpu"]
        row = dict(sampler=name, steps=args.steps, nfe=nfe, model_call_ms=1e3 * r["model_wall"],
                   loop_ms=1e3 * r["loop_wall"], overhead_ms_per_step=1e3 * over_wall / args.steps,
                   overhead_pct_wall=100 * over_wall / (nfe * r["model_wall"]),
                   overhead_pct_cpu=100 * over_cpu / (nfe * r["model_cpu"]),
                   bare_scan_ms=1e3 * r["bare_wall"],
                   overhead_vs_bare_scan_ms_per_step=1e3 * (r["loop_wall"] - r["bare_wall"]) / args.steps,
                   overhead_vs_bare_scan_pct=100 * (r["loop_wall"] - r["bare_wall"]) / r["bare_wall"],
                   overhead_vs_bare_scan_pct_cpu=100 * (r["loop_cpu"] - r["bare_cpu"]) / r["bare_cpu"],
                   loop_times_ms=[round(1e3 * t, 1) for t in r["loop_walls"]])
        results.append(row)
        print(f"{name:12s} {nfe:4d} {row['model_call_ms']:8.2f} {row['loop_ms']:9.1f} "
              f"{row['overhead_ms_per_step']:12.3f} {row['overhead_pct_wall']:9.1f}% {row['overhead_pct_cpu']:9.1f}% "
              f"{row['bare_scan_ms']:12.1f} {row['overhead_vs_bare_scan_pct']:13.1f}% "
              f"{row['overhead_vs_bare_scan_pct_cpu']:12.1f}%", flush=True)
    info["load_avg_after"] = common.load_average()
    common.emit(dict(benchmark="sampler_overhead", machine=info, unet=UNET_SMALL, unet_params=n_params, batch=BATCH,
                     image=(SIZE, SIZE, CH), results=results), args.json)


if __name__ == "__main__":
    main()
