"""Train the digits classifier of ``jaxdiff.metrics.digits_classifier`` and write its weights.

    python experiments/digits_classifier/train.py [--out jaxdiff/metrics/assets/digits_classifier.npz]

Trains on the ``train`` split of the sklearn digits (``load_digits("train")``: 90 %, stratified,
seed 0 -- the split the diffusion configs train on), reports the accuracy on the held-out
``test`` split and the digits Frechet distances of real digits, and writes the weights (float32
``.npz``, no pickle). Deterministic on a given machine (fixed seed, fixed number of steps).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxdiff.data.digits import load_digits
from jaxdiff.metrics import digits_classifier as D
from jaxdiff.metrics.fid import feature_statistics, frechet_distance


def report(params) -> dict:
    x_tr, y_tr = load_digits("train")
    x_te, y_te = load_digits("test")
    f_tr, _ = D.features_and_logits(x_tr, params)
    f_te, _ = D.features_and_logits(x_te, params)
    rng = np.random.default_rng(0)
    sub = f_tr[rng.choice(len(f_tr), len(f_te), replace=False)]
    return {
        "train_accuracy": D.class_accuracy(x_tr, y_tr, params),
        "test_accuracy": D.class_accuracy(x_te, y_te, params),
        "num_train": int(len(x_tr)), "num_test": int(len(x_te)),
        # held-out real digits vs all training digits: the floor a perfect generator reaches at this N
        "fd_test_vs_train": frechet_distance(*feature_statistics(f_te), *feature_statistics(f_tr)),
        # the same for a random subset of the training digits of the test split's size
        "fd_train_subset_vs_train": frechet_distance(*feature_statistics(sub), *feature_statistics(f_tr)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=D.DEFAULT_WEIGHTS)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    x, y = load_digits("train")
    t0 = time.time()
    params = jax.block_until_ready(D.train_classifier(x, y, seed=args.seed, steps=args.steps))
    seconds = time.time() - t0
    D.save_params(params, args.out)
    print(json.dumps({"out": args.out, "train_seconds": round(seconds, 1), **report(params)}, indent=2))


if __name__ == "__main__":
    main()
