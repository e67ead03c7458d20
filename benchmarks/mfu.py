"""Model FLOPs utilisation (MFU) of jaxdiff's train step against the measured matmul peak.

MFU = (model FLOPs of one train step, from XLA's cost analysis) / (median step time)
      / (measured peak: median FLOP/s of a large float32 matmul in JAX on the same machine).

Model FLOPs are counted on the ``conv_impl="xla"`` compilation of the step (the network as
defined: direct convolutions, nearest upsampling followed by a 3x3 conv); the timed step is the
one of ``--conv-impl``, which executes fewer FLOPs where the CPU path computes the upsampling
conv in its sub-pixel form. (The cost analysis of the timed executable is also
recorded, as ``executed_flops_per_step``; it counts the body of a ``lax.scan`` -- the blocked
kernel gradient -- once, so it is not a FLOP count of the step.) On an accelerator the model
FLOPs are those of the step's HLO before XLA's optimisations (:func:`common.hlo_flops`), since the
optimised executable's library calls may not be counted there.

The peak is *measured*, not a datasheet number: ``--matmul-n`` square matrices in the compute
dtype (``--dtype``; bf16 operands accumulate in float32), 4096 on a CPU and 8192 on a GPU by
default (2 n^3 FLOPs), median over repeats, with the backend's default precision (on a GPU
that lets float32 matmuls use TF32, as it does for the train step); PyTorch's rate for the
same matmul on its device is printed for reference. The train step is the one of
``training_vs_torch.py`` (UNet of ``common.UNET``, AdamW, batch 32); ``--model unet-cifar10``
is DDPM's CIFAR-10 UNet (Ho et al. 2020: 128 channels, 35.7M parameters), and ``--model
dit-b2`` DiT-B/2 (Peebles & Xie 2023) on 32x32x4 latents.

    python benchmarks/mfu.py [--model unet|unet-cifar10|dit-b2] [--batch 32] [--repeats 3]
        [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import training_vs_torch  # noqa: E402

DIT_B2 = dict(name="dit", variant="B/2", input_size=32, in_channels=4, num_classes=1000,
              learn_sigma=True)
UNET_CIFAR10 = dict(name="unet", ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,), dropout=0.1)
"""configs/cifar10_ddpm.py's network (Ho et al. 2020, CIFAR-10: 35.7M parameters)."""


def train_step_mfu(model: str, batch: int, repeats: int, warmup: int, conv_impl: str,
                   dtype: str) -> dict:
    from jaxdiff.nets.conv import resolve_conv_impl

    unet = {"unet": common.UNET, "unet-cifar10": UNET_CIFAR10, "dit-b2": DIT_B2}[model]
    unet = dict(unet, dtype=dtype)
    is_unet = unet["name"] == "unet"
    if not is_unet:
        # DiT: latents of 4 channels at 32x32 (the data fields are set from the net config).
        common.IMAGE_SIZE, common.CHANNELS = DIT_B2["input_size"], DIT_B2["in_channels"]
    else:
        unet["conv_impl"] = conv_impl
    step_fn, state, data, n_params = training_vs_torch.jaxdiff_train_step(batch, conv_impl, unet)
    lowered = step_fn.lower(state, data)
    unoptimised_flops = common.hlo_flops(lowered)
    compiled = lowered.compile()  # compiled once: timed and cost-analysed
    executed_flops = common.compiled_flops(compiled)
    flops = executed_flops
    import jax

    if jax.default_backend() != "cpu":
        flops = unoptimised_flops  # see hlo_flops
        if abs(executed_flops - flops) > 0.1 * flops:
            common.log(f"note: the optimised executable's cost analysis counts {executed_flops / 1e9:.1f} "
                       f"GFLOP/step against {flops / 1e9:.1f} in the HLO before optimisation (used)")
    elif is_unet and resolve_conv_impl(conv_impl) != "xla":
        # Model FLOPs are those of the network as defined (direct convolutions, nearest
        # upsampling then a 3x3 conv), i.e. of the conv_impl="xla" step; the sub-pixel upsample
        # layer of the CPU path executes fewer (16/36 of that layer's products).
        ref_fn, ref_state, ref_data, _ = training_vs_torch.jaxdiff_train_step(
            batch, "xla", dict(unet, conv_impl="xla"))
        flops = common.compiled_flops(ref_fn.lower(ref_state, ref_data).compile())
        del ref_fn, ref_state, ref_data
    step_fn = compiled
    box = [state]

    def one():
        box[0], metrics = step_fn(box[0], data)
        return metrics["loss"]

    t = common.median_time(one, repeats=repeats, warmup=warmup)
    return dict(t, flops_per_step=flops, executed_flops_per_step=executed_flops,
                unoptimised_hlo_flops_per_step=unoptimised_flops,
                flops_per_s=flops / t["median_s"], params=n_params)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="unet", choices=("unet", "unet-cifar10", "dit-b2"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--matmul-n", type=int, default=None,
                    help="peak matmul size (default 4096 on a CPU, 8192 on an accelerator)")
    ap.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "matmul"))
    common.add_precision_args(ap)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax

    n = args.matmul_n or (4096 if jax.default_backend() == "cpu" else 8192)
    info = common.machine_info()
    common.log(f"machine: {info}")
    peak = common.matmul_peak_jax(n, max(args.repeats, 3), args.dtype)
    common.log(f"jax {args.dtype} matmul {n}^2: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
    result = dict(benchmark="mfu", model=args.model, batch=args.batch, dtype=args.dtype,
                  conv_impl=args.conv_impl, matmul_peak_jax=peak, machine=info)
    if not args.skip_torch:
        tp = common.matmul_peak_torch(n, max(args.repeats, 3), args.dtype, args.torch_device)
        common.log(f"torch {args.dtype} matmul {n}^2 ({tp['device']}): "
                   f"{tp['flops_per_s'] / 1e9:.1f} GFLOP/s")
        result["matmul_peak_torch"] = tp
    step = train_step_mfu(args.model, args.batch, args.repeats, args.warmup, args.conv_impl,
                          args.dtype)
    mfu = step["flops_per_s"] / peak["flops_per_s"]
    common.log(f"train step ({args.model}, {step['params']:,} params, batch {args.batch}): "
               f"{step['flops_per_step'] / 1e9:.1f} model GFLOP/step (XLA cost analysis), median "
               f"{step['median_s']:.3f} s -> {step['flops_per_s'] / 1e9:.1f} GFLOP/s = "
               f"{100 * mfu:.1f}% of the measured matmul peak (target >= 50%)")
    result.update(train_step=step, mfu=mfu, load_avg_end=common.load_average())
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
