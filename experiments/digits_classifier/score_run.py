"""The README's "Evaluation" figures for a trained digits run (real-digit baselines, the
end-of-training samples' score, optionally bits/dim of the held-out digits).

    python experiments/digits_classifier/score_run.py --workdir runs/digits [--bpd_steps 50]

The `jaxdiff eval --features digits --num-samples N` rows come from the CLI itself.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compile_options
from jaxdiff.data.digits import load_digits
from jaxdiff.eval import digits_score, restore_for_sampling
from jaxdiff.generate import generate
from jaxdiff.metrics import digits_classifier as D
from jaxdiff.metrics import likelihood as L
from jaxdiff.modeling import build_process, denoiser


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--bpd_steps", type=int, default=0, help="RK4 steps for bits/dim (0: skip)")
    p.add_argument("--bpd_keys", type=int, default=2)
    args = p.parse_args()
    t0 = time.time()
    config, model, params, step = restore_for_sampling(args.workdir)
    sc = config.sample
    # the samples `jaxdiff train` scores at the end (same key, sampler, steps and number)
    images = generate(config, model, params, int(sc.num), jax.random.PRNGKey(int(config.seed) + 1),
                      sampler=sc.sampler, num_steps=int(sc.steps), progress=False)
    x_tr, _ = load_digits("train")
    x_te, y_te = load_digits("test")
    ten_per_class = np.concatenate([np.flatnonzero(y_te == c)[:10] for c in range(10)])
    out = {"checkpoint_step": step, "end_of_training": digits_score(config, images),
           "heldout180_vs_train_fd": D.digits_frechet_distance(x_te, x_tr),
           "heldout100_vs_train_fd": D.digits_frechet_distance(x_te[ten_per_class], x_tr),
           "heldout_accuracy": D.class_accuracy(x_te, y_te)}
    if args.bpd_steps:
        process = build_process(config)

        @compile_options.jit
        def bpd(x, y, key):
            return L.bits_per_dim(denoiser(config, model, params, y), process, x, key, levels=17,
                                  num_steps=args.bpd_steps)

        vals = np.concatenate([np.asarray(bpd(jnp.asarray(x_te), jnp.asarray(y_te), jax.random.PRNGKey(k)))
                               for k in range(args.bpd_keys)])
        out["heldout_bits_per_dim"] = float(vals.mean())
        out["heldout_bits_per_dim_sem"] = float(vals.std() / np.sqrt(len(vals)))
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
