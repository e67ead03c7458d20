"""Train-step time of the same global batch on 1 device vs a mesh of 8 (CPU devices by default).

    python benchmarks/step_time_devices.py [--config configs/digits.py] [--steps 20] [--fsdp 1]

On a CPU the 8 "devices" are XLA host-platform devices that share the same cores, so this
measures the overhead of partitioning (collectives, smaller per-device matmuls), not a speed-up.
On a machine with real accelerators pass ``--devices N`` <= the device count instead.
Prints the machine, versions, medians and the ratio; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time, statistics
sys.path.insert(0, ROOT)
import jax, numpy as np
from jaxdiff import compile_options, parallel
from jaxdiff.data import batch_iterator, make_source
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from jaxdiff.train.step import make_train_step
sys.path.insert(0, ROOT + "/scripts")
from memory_estimate import load_config
cfg = load_config(CONFIG)
n, fsdp, steps = N_DEVICES, FSDP, STEPS
devices = jax.devices()[:n]
cfg.mesh.data, cfg.mesh.fsdp = -1, fsdp if n > 1 else 1
mesh = parallel.make_mesh(-1, cfg.mesh.fsdp, devices)
model, tx = build_model(cfg), make_optimizer(cfg)
init = make_init_fn(cfg, model, tx)
abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
sh = parallel.state_shardings(abstract, mesh)
state = compile_options.jit(init, out_shardings=sh)(jax.random.PRNGKey(0))
step = compile_options.jit(make_train_step(cfg, model, tx), in_shardings=(sh, parallel.batch_sharding(mesh)),
               out_shardings=(sh, parallel.replicated(mesh)), donate_argnums=(0,))
batches = batch_iterator(make_source(cfg.data, "train"), int(cfg.data.batch_size), seed=0)
batch = parallel.shard_batch(next(batches), mesh)
t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(m); compile_s = time.perf_counter() - t0
times = []
for _ in range(steps):
    t0 = time.perf_counter(); state, m = step(state, batch); jax.block_until_ready(m); times.append(time.perf_counter() - t0)
close = getattr(batches, "close", None)
close and close()
print(json.dumps({"devices": n, "mesh": dict(mesh.shape), "first_step_s": compile_s,
                  "median_s": statistics.median(times), "min_s": min(times)}))
"""


def run(config: str, n: int, fsdp: int, steps: int, host_devices: int) -> dict:
    code = (CHILD.replace("ROOT", repr(ROOT)).replace("CONFIG", repr(config)).replace("N_DEVICES", str(n))
            .replace("FSDP", str(fsdp)).replace("STEPS", str(steps)))
    env = dict(os.environ)
    if host_devices:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={host_devices}").strip()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "digits.py"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--fsdp", type=int, default=1, help="fsdp axis of the multi-device run (data = devices / fsdp)")
    ap.add_argument("--cpu-host-devices", type=int, default=8,
                    help="--xla_force_host_platform_device_count for CPU runs (0: leave XLA_FLAGS alone)")
    args = ap.parse_args()
    import jax

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}; jax {jax.__version__}; config {args.config}")
    one = run(args.config, 1, 1, args.steps, args.cpu_host_devices)
    many = run(args.config, args.devices, args.fsdp, args.steps, args.cpu_host_devices)
    for r in (one, many):
        print(f"{r['devices']} device(s) {r['mesh']}: median {r['median_s'] * 1e3:.1f} ms/step "
              f"(min {r['min_s'] * 1e3:.1f}; first step incl. compile {r['first_step_s']:.1f} s)")
    ratio = many["median_s"] / one["median_s"]
    print(f"time ratio {args.devices} devices / 1 device: {ratio:.2f}  (load at end {os.getloadavg()[0]:.2f})")
    print(json.dumps({"one": one, "many": many, "ratio": ratio, "jax": jax.__version__}))


if __name__ == "__main__":
    main()
