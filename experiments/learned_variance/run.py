"""Learned variances on the embedded default (iDDPM, Nichol & Dhariwal 2021, Sec. 3.1 and Fig. 8).

Trains two class-conditional digits models of ``configs/digits.py`` that differ only in the
objective: ``simple`` (L_simple, the default: eps-MSE, fixed variances) and ``hybrid``
(``diffusion.variance="learned_range"``: the UNet gets 2 output channels, L_hybrid = L_simple +
0.001 L_vlb). Then, for each model:

* ancestral DDPM sampling (``ddpm``) on respaced grids of 10 ... 1000 steps with each reverse
  variance the model has -- ``fixed_small`` (beta~), ``fixed_large`` (beta), and for ``hybrid``
  the learned one -- scored with the committed digits classifier: Frechet distance (FD) of the
  samples' features to the training digits, and the fraction recognised as the requested class;
* the variational bound (``jaxdiff.variance.vlb_bits_per_dim``) of the held-out digits, in bits
  per dimension, with each variance (17 gray levels, x0_hat clipped to [-1, 1] as ADM's
  ``image_nll.py``).

iDDPM's claims this checks at small scale: with learned variances, ancestral sampling with few
steps is much better than with fixed ones (their Fig. 8), and L_hybrid lowers the bound.

    python experiments/learned_variance/run.py    # 35 min on 2 CPU cores: training 2 x 2.4, sampling and bounds ~30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from jaxdiff.checkpoint import CheckpointManager  # noqa: E402
from jaxdiff.data.digits import load_digits  # noqa: E402
from jaxdiff.eval import restore_for_sampling  # noqa: E402
from jaxdiff.generate import generate  # noqa: E402
from jaxdiff.metrics import digits_classifier as D  # noqa: E402
from jaxdiff.metrics.grid import save_image_grid  # noqa: E402
from jaxdiff.modeling import build_process, denoiser  # noqa: E402
from jaxdiff.train.loop import train  # noqa: E402
from jaxdiff.variance import vlb_bits_per_dim  # noqa: E402

STEPS = (10, 25, 50, 100, 250, 1000)


def load_config(objective: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_cfg", os.path.join(REPO, "configs", "digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    if objective == "hybrid":
        c.model.out_channels = 2  # prediction + variance interpolation v
        c.diffusion.variance = "learned_range"
    c.sample.num = 0
    return c


def trained(config, workdir, progress):
    """Train ``config`` in ``workdir`` unless a finished run is there; the EMA weights."""
    ckpt = CheckpointManager(workdir, save_every=1)
    step = ckpt.latest_step()
    ckpt.close()
    seconds = None
    if step is None or step < int(config.train.num_steps):
        t0 = time.time()
        train(config, workdir, progress=progress, sample_at_end=False)
        seconds = time.time() - t0
    _, model, params, step = restore_for_sampling(workdir)
    return model, params, int(step), seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/jaxdiff_learned_variance")
    ap.add_argument("--out", default=os.path.join(REPO, "experiments", "learned_variance"))
    ap.add_argument("--num", type=int, default=1000, help="samples per setting")
    ap.add_argument("--steps", default=",".join(map(str, STEPS)))
    ap.add_argument("--bound-draws", type=int, default=2, help="independent draws of the bound's x_t")
    ap.add_argument("--train-steps", type=int, default=None, help="override config.train.num_steps (smoke tests)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noprogress", action="store_true")
    ap.add_argument("--load-note", default="machine otherwise idle", help="what else ran (for the timings)")
    args = ap.parse_args()
    import matplotlib  # noqa: F401  (the [experiments] extra: fail now, not after the runs)

    progress = not args.noprogress
    steps = [int(s) for s in args.steps.split(",")]
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    train_x, _ = load_digits("train")
    test_x, test_y = load_digits("test")
    labels = np.arange(args.num, dtype=np.int32) % 10
    results = {"steps": steps, "num": args.num, "models": {},
               "real_heldout_fd": float(D.digits_frechet_distance(test_x, train_x))}

    for objective in ("simple", "hybrid"):
        config = load_config(objective)
        if args.train_steps:
            config.train.num_steps = config.optim.decay_steps = int(args.train_steps)
            config.optim.warmup_steps = min(int(config.optim.warmup_steps), int(args.train_steps) // 2)
        model, params, step, train_s = trained(config, os.path.join(args.workdir, objective), progress)
        print(f"{objective}: {step} steps" + (f", trained in {train_s:.0f} s" if train_s else " (reused)"), flush=True)
        variances = ["fixed_small", "fixed_large"] + (["learned_range"] if objective == "hybrid" else [])
        process = build_process(config)
        res = {"train_steps": step, "train_seconds": train_s, "sampling": {}, "bound": {}}
        for variance in variances:
            rows = []
            for n in steps:
                t0 = time.time()
                images = generate(config, model, params, args.num, jax.random.PRNGKey(args.seed), sampler="ddpm",
                                  num_steps=n, batch_size=args.num, labels=labels, progress=False, variance=variance)
                seconds = time.time() - t0
                _, logits = D.features_and_logits(images)
                row = {"steps": n, "fd": float(D.digits_frechet_distance(images, train_x)),
                       "accuracy": float(np.mean(np.argmax(logits, 1) == labels)), "seconds": round(seconds, 1)}
                rows.append(row)
                print(f"  ddpm {variance:13s} {n:5d} steps: FD {row['fd']:7.2f}  accuracy {row['accuracy']:.3f}"
                      f"  ({seconds:.0f} s)", flush=True)
                if n == 50:
                    order = np.argsort(labels[:100], kind="stable")
                    save_image_grid(np.asarray(images[:100])[order],
                                    os.path.join(args.out, f"grid_{objective}_{variance}_50.png"), nrow=10)
            res["sampling"][variance] = rows
            den = denoiser(config, model, params, jnp.asarray(test_y), with_variance=variance == "learned_range")
            fn = jax.jit(lambda k, d=den, v=variance: vlb_bits_per_dim(
                d, process, jnp.asarray(test_x), k, variance=v, clip_denoised=1.0, bins=17)["total"])
            t0 = time.time()
            draws = [float(jnp.mean(fn(jax.random.PRNGKey(1000 + i)))) for i in range(args.bound_draws)]
            res["bound"][variance] = {"bits_per_dim": float(np.mean(draws)), "draws": draws,
                                      "seconds": round(time.time() - t0, 1)}
            print(f"  bound {variance:13s}: {np.mean(draws):.4f} bits/dim (draws {draws})", flush=True)
        results["models"][objective] = res

    results["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend(),
                          "load": args.load_note}
    results["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, args)
    plot(results, args.out)


def write_markdown(results, args):
    steps = results["steps"]
    lines = [
        "# Learned variances on digits (iDDPM Sec. 3.1, Fig. 8)",
        "",
        f"Written by `experiments/learned_variance/run.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{results['machine']['cpus']} CPUs ({results['machine']['processor']}), jax {results['machine']['jax']}, "
        f"{results['machine']['load']}; {results['seconds'] / 60:.1f} min in all.",
        "",
        f"Two `configs/digits.py` models ({results['models']['simple']['train_steps']:,} steps each): `simple` = "
        "L_simple (the default), `hybrid` = `diffusion.variance=\"learned_range\"` (2 output channels, "
        "L_hybrid). `ddpm` on `linspace` grids (respaced betas), "
        f"{results['num']} class-conditional samples per cell (labels 0..9 cycled, same initial noise and keys "
        "across cells). Each cell: digits FD to the training digits (lower is better; the 180 held-out real "
        f"digits score {results['real_heldout_fd']:.2f}, and FD is biased upwards at small N) / fraction "
        "classified as the requested digit.",
        "",
        "| model | reverse variance | " + " | ".join(f"{n} steps" for n in steps) + " |",
        "| --- | --- | " + " | ".join("---" for _ in steps) + " |",
    ]
    for objective, res in results["models"].items():
        for variance, rows in res["sampling"].items():
            cells = " | ".join(f"{r['fd']:.2f} / {r['accuracy']:.3f}" for r in rows)
            lines.append(f"| {objective} | {variance} | {cells} |")
    lines += ["", f"Variational bound of the 180 held-out digits (bits/dim, 17 levels; mean of "
              f"{args.bound_draws} draws of x_t; log2(17) = 4.09 is a uniform model):", "",
              "| model | fixed_small | fixed_large | learned_range |", "| --- | --- | --- | --- |"]
    for objective, res in results["models"].items():
        b = res["bound"]
        cell = lambda v: f"{b[v]['bits_per_dim']:.3f}" if v in b else "-"  # noqa: E731
        lines.append(f"| {objective} | {cell('fixed_small')} | {cell('fixed_large')} | {cell('learned_range')} |")
    lines += ["", "Sample grids (50 steps, row = requested digit): `grid_<model>_<variance>_50.png`; "
              "plot: `fd_vs_steps.png`; raw numbers: `results.json`.", ""]
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines))


def plot(results, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for objective, res in results["models"].items():
        for variance, rows in res["sampling"].items():
            ax.plot([r["steps"] for r in rows], [r["fd"] for r in rows], marker="o",
                    linestyle="-" if objective == "hybrid" else "--", label=f"{objective}, {variance}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("ddpm steps")
    ax.set_ylabel("digits FD (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fd_vs_steps.png"), dpi=120)


if __name__ == "__main__":
    main()
