"""Where the time of a jaxdiff train step (or UNet forward pass) goes, by kind of operation.

Runs the benchmark UNet's jitted step (``training_vs_torch.jaxdiff_train_step``, batch 32 by
default) or its forward pass (``--what forward``, the work of one sampler step, batch 16) under
``jax.profiler`` with a Perfetto trace, and sums the traced duration of every XLA:CPU thunk.
Each thunk is named after its HLO instruction; the compiled module's ``op_name`` metadata
(``jit(train_step)/jvp(UNet)/down_0_block_0/GroupNorm_0/...``) says which model operation it
belongs to and whether it is forward (``jvp``), backward (``transpose``) or neither (optimizer,
EMA). Categories:

* ``conv``: XLA convolutions (forward; input gradient; native kernel gradient);
* ``conv kernel grad (jaxdiff)``: jaxdiff's blocked-matmul kernel gradient
  (:mod:`jaxdiff.nets.conv`): the strided input views and their matrix products;
* ``attention``, ``norm``, ``dropout``, ``dense`` (Dense layers), ``elementwise / other``;
* ``optimizer / EMA``: everything outside the model's forward and backward.

With :mod:`jaxdiff.compile_options` in effect (the default on CPU), XLA's own (Eigen)
convolutions do not appear among the traced thunks, so the ``conv`` categories come out nearly
empty; run with ``JAXDIFF_CPU_COMPILER_OPTIONS=0`` for the jaxlib-default compilation (YNNPACK
convolutions, which are traced).

Thunk durations are summed per category. XLA:CPU runs independent thunks concurrently on its
threads, so the sum can exceed the wall time; the script prints both, and shares of the sum.

    python benchmarks/profile_step.py [--what train|forward] [--batch N] [--steps 2]
        [--conv-impl auto|xla|matmul] [--top 15] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

_INSTR = re.compile(r"\s*%?([\w.\-]+) = \S+ \w+\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def instruction_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata ('' when absent)."""
    out = {}
    for line in hlo_text.split("\n"):
        m = _INSTR.match(line)
        if m:
            op = _OP_NAME.search(line)
            out[m.group(1)] = op.group(1) if op else ""
    return out


def categorize(op_name: str) -> str:
    """A coarse category of one HLO instruction from its ``op_name`` metadata."""
    if "transpose(" in op_name:
        phase = "bwd"
    elif re.search(r"jvp\(|/UNet|/DiT", op_name):
        phase = "fwd"
    else:
        return "optimizer / EMA / other"
    last = op_name.rsplit("/", 1)[-1]
    if "Dropout" in op_name:
        kind = "dropout"
    elif "conv_general_dilated" in last:
        kind = "conv"
    elif phase == "bwd" and re.search(r"(^|/)(slice|split|dot_general|pad|stack)$", op_name) \
            and not re.search(r"attn|Dense|Attention", op_name):
        kind = "conv kernel grad (jaxdiff)"
    elif re.search(r"attn|Attention", op_name):
        kind = "attention"
    elif re.search(r"[Nn]orm", op_name):
        kind = "norm"
    elif "Dense" in op_name or "dot_general" in last:
        kind = "dense"
    else:
        kind = "elementwise / other"
    return f"{phase} {kind}"


def thunk_times(trace_dir: str) -> dict[str, tuple[float, int]]:
    """Summed duration (us) and count of each complete event in the Perfetto trace."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no Perfetto trace under {trace_dir}")
    with gzip.open(sorted(files)[-1]) as f:
        events = json.load(f)["traceEvents"]
    tot: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            tot[e["name"]][0] += e["dur"]
            tot[e["name"]][1] += 1
    return {k: (v[0], v[1]) for k, v in tot.items()}


def build(what: str, batch: int, conv_impl: str):
    """``(fn, args_now, call)``: the jitted function, a thunk giving its current arguments (for
    lowering) and one call (train: one step on the carried state)."""
    import jax
    import jax.numpy as jnp

    if what == "train":
        import training_vs_torch

        step, state, data, _ = training_vs_torch.jaxdiff_train_step(batch, conv_impl)
        box = [state]

        def call():
            box[0], metrics = step(box[0], data)
            return metrics

        return step, (lambda: (box[0], data)), call
    import sampling_vs_diffusers

    from jaxdiff.modeling import build_model

    model = build_model(sampling_vs_diffusers.jaxdiff_config("unet", conv_impl))
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, common.IMAGE_SIZE, common.IMAGE_SIZE,
                                                  common.CHANNELS))
    t = jnp.full((batch,), 0.5)
    params = jax.jit(lambda k: model.init(k, x[:1], t[:1], None))(jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)  # zero-init layers would output exactly 0
    from jaxdiff import compile_options

    fwd = compile_options.jit(lambda p, x, t: model.apply({"params": p}, x, t, None))
    return fwd, (lambda: (params, x, t)), (lambda: fwd(params, x, t))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--what", choices=("train", "forward"), default="train")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 (train), 16 (forward)")
    ap.add_argument("--steps", type=int, default=2, help="profiled calls (after 2 warm-up calls)")
    ap.add_argument("--conv-impl", default="auto")
    ap.add_argument("--top", type=int, default=12, help="also list the N slowest instructions")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    batch = args.batch or (32 if args.what == "train" else 16)

    import jax

    fn, args_now, call = build(args.what, batch, args.conv_impl)
    names = instruction_op_names(fn.lower(*args_now()).compile().as_text())
    for _ in range(2):
        jax.block_until_ready(call())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(args.steps):
            jax.block_until_ready(call())
        jax.profiler.stop_trace()
        wall = (time.perf_counter() - t0) / args.steps
        times = thunk_times(d)

    per_cat: dict[str, float] = collections.Counter()
    per_instr = []
    for name, (us, _) in times.items():
        if name in names:
            ms = us / 1e3 / args.steps
            per_cat[categorize(names[name])] += ms
            per_instr.append((ms, name, names[name]))
    total = sum(per_cat.values())
    common.log(f"{args.what}, batch {batch}, conv_impl={args.conv_impl}: wall {wall * 1e3:.0f} ms "
               f"per call under the profiler; summed thunk time {total:.0f} ms")
    common.log("| category | thunk ms per call | share |\n| --- | --- | --- |")
    for cat, ms in sorted(per_cat.items(), key=lambda kv: -kv[1]):
        common.log(f"| {cat} | {ms:.1f} | {100 * ms / total:.1f}% |")
    common.log(f"\nslowest {args.top} instructions:")
    for ms, name, op in sorted(per_instr, reverse=True)[: args.top]:
        common.log(f"  {ms:7.1f} ms  {name:28s} {op[-90:]}")
    common.emit({
        "benchmark": "profile_step", "what": args.what, "batch": batch, "conv_impl": args.conv_impl,
        "wall_ms_under_profiler": round(wall * 1e3, 1), "thunk_ms_total": round(total, 1),
        "thunk_ms_by_category": {k: round(v, 1) for k, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "machine": common.machine_info(),
    }, args.json)


if __name__ == "__main__":
    main()
