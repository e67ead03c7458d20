"""Per-device memory of the train state (params + AdamW moments + EMA copies) under fsdp.

    python scripts/memory_estimate.py --config configs/imagenet256_dit.py --fsdp 1 8 64

The state's shapes come from ``jax.eval_shape`` of the trainer's own init function (nothing is
allocated); each array is then laid out with the trainer's rule (:func:`jaxdiff.parallel.
param_partition_spec`) for an fsdp axis of the given size. Activations, gradients in flight
and XLA's temporary buffers are not counted: this is the resident state only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdiff import parallel  # noqa: E402
from jaxdiff.modeling import build_model  # noqa: E402
from jaxdiff.train.loop import make_init_fn  # noqa: E402
from jaxdiff.train.state import make_optimizer  # noqa: E402


def load_config(path: str):
    path, _, variant = path.partition(":")
    spec = importlib.util.spec_from_file_location("_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def per_device_bytes(abstract, fsdp: int) -> dict:
    """Bytes per device of each part of the state (params / opt_state / ema / other)."""
    out = {"params": 0, "opt_state": 0, "ema": 0, "other": 0}

    def visit(path, leaf):
        name = parallel._path_str(path)
        spec = parallel.param_partition_spec(name, leaf.shape, fsdp)
        n = math.prod(leaf.shape) if leaf.shape else 1
        shards = fsdp if any(a == "fsdp" for a in spec) else 1
        part = name.split("/", 1)[0]
        out[part if part in out else "other"] += n * np.dtype(leaf.dtype).itemsize // shards

    jax.tree_util.tree_map_with_path(visit, abstract)
    out["total"] = sum(out.values())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/imagenet256_dit.py")
    ap.add_argument("--fsdp", type=int, nargs="+", default=[1, 8, 64])
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    abstract = jax.eval_shape(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg)), jax.random.PRNGKey(0))
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
    print(f"{args.config}: {cfg.model.name}, {n_params:,} trainable parameters, "
          f"{len(abstract.ema)} EMA copies, optimizer {cfg.optim.get('name', 'adamw')}")
    print(f"{'fsdp':>6} {'params':>10} {'opt_state':>10} {'ema':>10} {'total/device':>13}")
    rows = []
    for f in args.fsdp:
        b = per_device_bytes(abstract, f)
        rows.append({"fsdp": f, **b})
        gib = {k: v / 2**30 for k, v in b.items()}
        print(f"{f:>6} {gib['params']:>9.2f}G {gib['opt_state']:>9.2f}G {gib['ema']:>9.2f}G {gib['total']:>12.2f}G")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
