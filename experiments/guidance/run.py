"""Guidance on the embedded default: CFG scales, interval, rescale, classifier and training-free guidance.

Trains (or reuses) the class-conditional digits model of ``configs/digits.py`` (label dropout 0.1
to the null class), then samples ``--per-class`` digits of every class with each guidance
setting from the same initial noise and scores them with the committed digits classifier
(``jaxdiff.metrics.digits_classifier``): the accuracy with which it recognises the requested class
(per class and overall) and the digits Frechet distance (FD) of the samples to the training
digits. Writes ``results.md``, ``results.json``, ``guidance.png`` (accuracy and FD vs CFG scale)
and one grid per setting (row = class) under ``--out``.

Settings:

* ``uncond`` (CFG scale 0: the null class), ``cond`` (scale 1: the conditional model, unguided),
  CFG at 1.5 / 3 / 5; CFG 3 within a guidance interval; CFG 5 with rescale 0.7;
* classifier guidance (Dhariwal & Nichol 2021) of the unconditional branch with a noise-aware
  classifier trained here (``jaxdiff.nets.classifier.NoisyClassifier``);
* training-free guidance (TFG, Ye et al. 2024) of the unconditional branch with an off-the-shelf
  predictor: a scikit-learn logistic regression fitted on the clean training digits -- a model
  independent of the CNN that scores the samples.

    python experiments/guidance/run.py                 # ~13 min on 2 CPU cores: training ~3.5, guided sampling ~10
    python experiments/guidance/run.py --workdir DIR   # reuse a finished `jaxdiff train` workdir
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

from jaxdiff import compile_options, guidance, samplers  # noqa: E402
from jaxdiff.checkpoint import CheckpointManager  # noqa: E402
from jaxdiff.data.digits import load_digits  # noqa: E402
from jaxdiff.generate import generate  # noqa: E402
from jaxdiff.metrics import digits_classifier as D  # noqa: E402
from jaxdiff.metrics.grid import save_image_grid  # noqa: E402
from jaxdiff.modeling import build_model, build_process, data_shape, denoiser  # noqa: E402
from jaxdiff.nets.classifier import NoisyClassifier  # noqa: E402
from jaxdiff.schedules import make_grid  # noqa: E402
from jaxdiff.train.classifier import classifier_log_prob, noisy_accuracy, train_noisy_classifier  # noqa: E402
from jaxdiff.train.loop import make_init_fn, sampling_params, train  # noqa: E402
from jaxdiff.train.state import make_optimizer  # noqa: E402


def load_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_cfg", os.path.join(REPO, "configs", "digits.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def trained_params(config, workdir, progress):
    ckpt = CheckpointManager(workdir, save_every=1)
    step = ckpt.latest_step()
    if step is None or step < int(config.train.num_steps):
        ckpt.close()
        config.sample.num = 0
        t0 = time.time()
        train(config, workdir, progress=progress, sample_at_end=False)
        print(f"trained {config.train.num_steps} steps in {time.time() - t0:.0f} s", flush=True)
        ckpt = CheckpointManager(workdir, save_every=1)
        step = ckpt.latest_step()
    model = build_model(config)
    abstract = jax.eval_shape(make_init_fn(config, model, make_optimizer(config)), jax.random.PRNGKey(0))
    state = ckpt.restore(abstract, step)
    ckpt.close()
    return model, sampling_params(state, config.sample.get("params")), int(step)


def logistic_predictor(train_x, train_y):
    """An off-the-shelf clean-data classifier: multinomial logistic regression (scikit-learn)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=0.5).fit(train_x.reshape(len(train_x), -1), train_y)
    w = jnp.asarray(clf.coef_.T, jnp.float32)
    b = jnp.asarray(clf.intercept_, jnp.float32)
    return clf, lambda x0: jax.nn.log_softmax(jnp.reshape(x0, (x0.shape[0], -1)) @ w + b[None], axis=-1)


def score(images, labels, train_images):
    _, logits = D.features_and_logits(images)
    pred = np.argmax(logits, 1)
    per_class = [float(np.mean(pred[labels == k] == k)) for k in range(10)]
    return {"accuracy": float(np.mean(pred == labels)), "per_class": per_class,
            "fd": float(D.digits_frechet_distance(images, train_images))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/jaxdiff_guidance_digits")
    ap.add_argument("--out", default=os.path.join(REPO, "experiments", "guidance"))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--classifier-steps", type=int, default=2000)
    ap.add_argument("--train-steps", type=int, default=None, help="override config.train.num_steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noprogress", action="store_true")
    ap.add_argument("--load-note", default="machine otherwise idle", help="what else ran (for the timings)")
    args = ap.parse_args()
    import matplotlib  # noqa: F401  (the [experiments] extra: fail now, not after the runs)

    progress = not args.noprogress
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)

    config = load_config()
    if args.train_steps:
        config.train.num_steps = config.optim.decay_steps = int(args.train_steps)
        config.optim.warmup_steps = min(int(config.optim.warmup_steps), int(args.train_steps) // 2)
    model, params, step = trained_params(config, args.workdir, progress)
    process = build_process(config)
    train_x, train_y = load_digits("train")
    n = 10 * args.per_class
    labels = np.arange(n, dtype=np.int32) % 10
    key = jax.random.PRNGKey(args.seed)
    results = {}

    def record(name, images, seconds, **extra):
        images = np.asarray(images)
        results[name] = dict(score(images, labels, train_x), seconds=round(seconds, 2), **extra)
        order = np.argsort(labels[:100], kind="stable")  # rows = classes (10 of each in the first 100)
        save_image_grid(images[:100][order], os.path.join(args.out, f"grid_{name}.png"), nrow=10)
        r = results[name]
        print(f"{name:>18}: accuracy {r['accuracy']:.3f}  FD {r['fd']:.2f}  ({seconds:.1f} s)", flush=True)

    # ---- classifier-free guidance (one batched model call per step) ------------------------
    cfg_runs = [("uncond", dict(scale=0.0)), ("cond", dict(scale=1.0)), ("cfg1.5", dict(scale=1.5)),
                ("cfg3", dict(scale=3.0)), ("cfg5", dict(scale=5.0)),
                ("cfg3_interval", dict(scale=3.0, interval=(0.3, 5.0))),
                ("cfg5_rescale0.7", dict(scale=5.0, rescale=0.7))]
    for name, g in cfg_runs:
        t0 = time.time()
        images = generate(config, model, params, n, key, sampler=args.sampler, num_steps=args.steps,
                          batch_size=n, labels=labels, progress=False,
                          guidance_override=dict(dict(interval=None, rescale=0.0), **g))
        record(name, images, time.time() - t0, **{k: v for k, v in g.items()})

    # the same initial noise for the transforms below: generate()'s batch-0 key split
    grid = make_grid(process, args.steps)
    k_init, k_sampler = jax.random.split(jax.random.fold_in(key, 0))
    x_T = grid.prior_sample(k_init, (n,) + data_shape(config))
    sampler = samplers.get(args.sampler)
    y = jnp.asarray(labels)
    uncond = denoiser(config, model, params, None)  # label None = the null class

    # ---- classifier guidance with a noise-aware classifier trained here ---------------------
    t0 = time.time()
    clf_model = NoisyClassifier(num_classes=10, ch=32, ch_mult=(1, 2))
    clf_params, losses = train_noisy_classifier(clf_model, process, train_x, train_y, num_steps=args.classifier_steps,
                                                batch_size=128, lr=2e-3, key=jax.random.key(args.seed + 7),
                                                progress=progress)
    test_x, test_y = load_digits("test")
    clf_acc = {str(t): noisy_accuracy(clf_model, clf_params, process, test_x, test_y, t, jax.random.key(1))
               for t in (0, 250, 500, 750)}
    clf_seconds = time.time() - t0
    print(f"noisy classifier: {args.classifier_steps} steps in {clf_seconds:.0f} s; held-out accuracy at "
          f"t=0/250/500/750: {', '.join(f'{v:.3f}' for v in clf_acc.values())}", flush=True)
    log_prob = classifier_log_prob(clf_model, clf_params, process, y)
    for s in (1.0, 3.0, 10.0):
        f = compile_options.jit(lambda x, k, s=s: sampler(guidance.classifier_guidance(uncond, log_prob, process, s), x, grid, key=k))
        t0 = time.time()
        images = jax.block_until_ready(f(x_T, k_sampler))
        record(f"classifier{s:g}", images, time.time() - t0, scale=s)

    # ---- training-free guidance with an off-the-shelf clean classifier ------------------------
    clf, log_f = logistic_predictor(train_x, train_y)
    lr_acc = float(clf.score(test_x.reshape(len(test_x), -1), test_y))
    print(f"logistic regression (off-the-shelf predictor): held-out accuracy {lr_acc:.3f}", flush=True)
    ll = lambda x0: jnp.take_along_axis(log_f(x0), y[:, None], axis=1)[:, 0]  # noqa: E731
    var = dict(variance_strength=10.0, max_update_norm=4.0)  # picked on 200 samples (README)
    tfg_runs = [("tfg_mean", dict(mean_strength=0.02, mean_iters=2), 1),
                ("tfg_variance", var, 1),
                ("tfg_variance_recur2", var, 2),
                ("tfg_variance+mean", dict(var, mean_strength=0.005, mean_iters=2), 1),
                ("tfg_variance+smooth", dict(var, smoothing=0.3, num_samples=4), 1)]
    ddim = samplers.get("ddim")  # TFG's base sampler; recurrence needs a one-step sampler
    for name, opts, recur in tfg_runs:
        def run(x, k, opts=opts, recur=recur):
            d = guidance.training_free_guidance(uncond, ll, process, key=jax.random.key(3), **opts)
            return guidance.with_recurrence(ddim, recur)(d, x, grid, key=k) if recur > 1 else ddim(d, x, grid)
        t0 = time.time()
        images = jax.block_until_ready(compile_options.jit(run)(x_T, k_sampler))
        record(name, images, time.time() - t0, recurrence=recur, **opts)

    meta = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, {os.cpu_count()} CPU cores",
                jax=jax.__version__, checkpoint_step=step, sampler=args.sampler, steps=args.steps,
                samples_per_setting=n, noisy_classifier_steps=args.classifier_steps,
                noisy_classifier_heldout_accuracy=clf_acc, logistic_regression_heldout_accuracy=lr_acc,
                total_seconds=round(time.time() - t_start, 1), load_note=args.load_note)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    write_markdown(args.out, meta, results)
    plot(args.out, results)
    print(f"done in {time.time() - t_start:.0f} s; wrote {args.out}/results.md, guidance.png, grid_*.png")


def write_markdown(out, meta, results):
    lines = ["# Guidance on the embedded default (class-conditional digits UNet)", "",
             f"Measured {meta['date']} on {meta['machine']}, jax {meta['jax']}; checkpoint step "
             f"{meta['checkpoint_step']}; {meta['sampler']} with {meta['steps']} steps (ddim for TFG); "
             f"{meta['samples_per_setting']} samples per setting (100 per class, the same initial noise "
             f"for every setting). Accuracy: the committed digits CNN recognises the requested class; "
             f"FD: digits Frechet distance to the training digits (lower is better). Total run "
             f"{meta['total_seconds']:.0f} s ({meta['load_note']}).", "",
             "| setting | accuracy | FD | worst class (accuracy) | sampling s (incl. compile) |", "|---|---|---|---|---|"]
    for name, r in results.items():
        worst = int(np.argmin(r["per_class"]))
        lines.append(f"| {name} | {r['accuracy']:.3f} | {r['fd']:.2f} | {worst} ({r['per_class'][worst]:.2f}) "
                     f"| {r['seconds']:.1f} |")
    lines += ["", "Per-class accuracy:", "", "| setting | " + " | ".join(str(k) for k in range(10)) + " |",
              "|---|" + "---|" * 10]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["per_class"]) + " |")
    acc = meta["noisy_classifier_heldout_accuracy"]
    lines += ["", f"Noise-aware classifier ({meta['noisy_classifier_steps']} steps): held-out accuracy at "
              f"t = 0 / 250 / 500 / 750 of {', '.join(f'{v:.3f}' for v in acc.values())}. Off-the-shelf "
              f"predictor for TFG: logistic regression on clean digits, held-out accuracy "
              f"{meta['logistic_regression_heldout_accuracy']:.3f}.", ""]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))


def plot(out, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [("uncond", 0.0), ("cond", 1.0), ("cfg1.5", 1.5), ("cfg3", 3.0), ("cfg5", 5.0)]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    xs = [s for _, s in scales]
    ax[0].plot(xs, [results[n]["accuracy"] for n, _ in scales], "o-", label="CFG")
    ax[1].plot(xs, [results[n]["fd"] for n, _ in scales], "o-", label="CFG")
    others = [n for n in results if n not in dict(scales)]
    for i, n in enumerate(others):
        ax[0].axhline(results[n]["accuracy"], ls=":", color=f"C{i + 1}", label=n)
        ax[1].axhline(results[n]["fd"], ls=":", color=f"C{i + 1}", label=n)
    ax[0].set(xlabel="CFG scale (0 = unconditional, 1 = conditional)", ylabel="classifier accuracy on requested class")
    ax[1].set(xlabel="CFG scale", ylabel="digits FD to training digits (log scale)", yscale="log")
    ax[1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Guidance on the class-conditional digits model")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "guidance.png"), dpi=110)
    # FD vs accuracy trade-off
    fig, ax = plt.subplots(figsize=(5, 4))
    for n, r in results.items():
        ax.scatter(r["fd"], r["accuracy"])
        ax.annotate(n, (r["fd"], r["accuracy"]), fontsize=7)
    ax.set(xlabel="digits FD (lower = closer to data; log scale)", ylabel="accuracy on requested class", xscale="log")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "tradeoff.png"), dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:  # redraw the plots from results.json
        out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(REPO, "experiments", "guidance")
        with open(os.path.join(out, "results.json")) as fh:
            plot(out, json.load(fh)["results"])
    else:
        main()
