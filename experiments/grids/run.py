"""FD vs NFE of the default digits model: samplers x time grids, and each one's ODE error.

The DPM-Solver / UniPC papers' kind of table on a real trained network (the README's main job:
``configs/digits.py``, DDPM linear betas over 1,000 discrete steps, 702,753-parameter UNet),
scored with the committed digits classifier (``jaxdiff.metrics.digits_classifier``):

1. ``jaxdiff.eval.run_eval_sweep`` -- ``jaxdiff eval --features digits --sampler ... --steps ...
   --grid ...``: digits FD (Frechet distance of classifier features to the training digits),
   Inception-style score and class accuracy of ``--num`` samples per setting, all from the same
   seed, with the NFE each setting spends;
2. the error of each setting against the probability-flow ODE's solution from the same initial
   noise (Heun with 300 log-SNR-uniform steps; a second reference, Heun with 200 linspace steps,
   lands within the ``ref_gap`` printed in the results), RMS over ``--ode-num`` samples in [-1, 1]
   pixel units.

    python experiments/grids/run.py                    # trains the default model first (~3 min)
    python experiments/grids/run.py --workdir DIR      # reuse a finished `jaxdiff train` workdir

Writes ``results.md`` and ``results.json`` under ``--out``, and the ODE reference solver's own
scores in ``ode_reference_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from jaxdiff.eval import restore_for_sampling, run_eval, run_eval_sweep  # noqa: E402
from jaxdiff.generate import generate  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="a finished `jaxdiff train --config configs/digits.py` workdir")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--samplers", default="ddim,dpmpp_2m,unipc,heun")
    ap.add_argument("--grids", default="linspace,trailing,logsnr,karras")
    ap.add_argument("--steps", default="5,10,20")
    ap.add_argument("--num", type=int, default=1000, help="samples per setting for the FD")
    ap.add_argument("--ode-num", type=int, default=200, help="samples per setting for the ODE error")
    args = ap.parse_args(argv)
    samplers_, grids, steps = args.samplers.split(","), args.grids.split(","), [int(s) for s in args.steps.split(",")]
    t0 = time.time()
    workdir = args.workdir
    if workdir is None:
        from jaxdiff.train import train
        from experiments.guidance.run import load_config  # the default config, as `jaxdiff train` loads it

        workdir = os.path.join(args.out, "workdir")
        train(load_config(), workdir, progress=False)

    sweep = run_eval_sweep(workdir, num=args.num, samplers=samplers_, steps=steps, grids=grids, features="digits",
                           progress=False)["results"]

    config, model, params, step = restore_for_sampling(workdir)
    key = jax.random.PRNGKey(1)  # one key for every setting (batches of --ode-num: not the eval's noise)

    def draw(sampler, n, grid):
        return generate(config, model, params, args.ode_num, key, sampler=sampler, num_steps=n,
                        batch_size=args.ode_num, grid_kind=grid, progress=False)

    ref = draw("heun", 300, "logsnr")
    ref_gap = float(np.sqrt(np.mean((draw("heun", 200, "linspace") - ref) ** 2)))
    # the FD of the ODE solution itself (the reference solver on --num samples, the eval's seed)
    scored = run_eval(workdir, num=args.num, sampler="heun", steps=300, grid="logsnr", features="digits",
                      progress=False, out=os.path.join(args.out, "ode_reference_eval.json"))
    for r in sweep:
        r["ode_error"] = float(np.sqrt(np.mean((draw(r["sampler"], r["steps"], r["grid"]) - ref) ** 2)))
        print(f"{r['sampler']:10s} {r['grid']:9s} {r['steps']:3d} NFE {r['nfe']:3d} FD {r['fid']:8.3f} "
              f"ODE error {r['ode_error']:.4f}", flush=True)
    elapsed = time.time() - t0
    info = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "jax": jax.__version__, "workdir": os.path.abspath(workdir),
            "checkpoint_step": step, "num": args.num, "ode_num": args.ode_num, "ref_gap": ref_gap,
            "ode_reference_fd": scored["fid"], "ode_reference_accuracy": scored["class_accuracy"],
            "ode_reference_nfe": scored["nfe"],
            "seconds": round(elapsed, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"info": info, "results": sweep}, f, indent=2)
    write_markdown(os.path.join(args.out, "results.md"), sweep, info, samplers_, grids, steps)


def rewrite(out):
    """results.md again from results.json (after a change to the layout)."""
    with open(os.path.join(out, "results.json")) as f:
        d = json.load(f)
    rows = d["results"]
    order = lambda key: list(dict.fromkeys(r[key] for r in rows))  # noqa: E731
    write_markdown(os.path.join(out, "results.md"), rows, d["info"], order("sampler"), order("grid"), order("steps"))


def write_markdown(path, rows, info, samplers_, grids, steps):
    cell = {(r["sampler"], r["grid"], r["steps"]): r for r in rows}
    lines = ["# FD vs NFE of the default digits model: samplers x time grids", "",
             f"Generated by `python experiments/grids/run.py` on {info['date_utc']} UTC ({info['cores']} CPU cores, "
             f"jax {info['jax']}, {info['seconds'] / 60:.1f} min), checkpoint step {info['checkpoint_step']} of the "
             "default digits run. Each cell: digits FD of "
             f"{info['num']} samples (same seed everywhere) / RMS error against the probability-flow ODE's solution "
             f"from the same noise ({info['ode_num']} samples; references differ by {info['ref_gap']:.1e}). "
             f"The reference solver itself (Heun, 300 `logsnr` steps, NFE {info['ode_reference_nfe']}) scores FD "
             f"{info['ode_reference_fd']:.2f}, class accuracy {info['ode_reference_accuracy']:.3f}. "
             "NFE = denoiser evaluations per sample (`samplers.count_nfe`).", ""]
    for grid in grids:
        lines += [f"**grid `{grid}`**", "", "| sampler | " + " | ".join(f"{n} steps" for n in steps) + " |",
                  "|---|" + "---|" * len(steps)]
        for s in samplers_:
            rows_ = [cell[(s, grid, n)] for n in steps]
            lines.append(f"| {s} | " + " | ".join(f"{r['fid']:.2f} / {r['ode_error']:.4f} (NFE {r['nfe']})"
                                                   for r in rows_) + " |")
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
