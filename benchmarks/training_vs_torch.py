"""Training throughput: jaxdiff's train step vs the same UNet trained by PyTorch, same run.

Both sides train the UNet of ``common.UNET`` (jaxdiff ``UNet`` / diffusers ``UNet2DModel``,
parameter counts printed and checked equal) on DDPM's epsilon loss (Ho et al. 2020, Eq. 14;
linear betas, T = 1000) at batch 32, 32x32x3, with AdamW (lr 2e-4), global-norm clipping at 1
and one EMA copy (0.999) -- what ``configs/cifar10_ddpm.py`` runs, at a CPU-sized width.

* jaxdiff: ``jaxdiff.train.step.make_train_step`` jitted with ``donate_argnums=(0,)`` as in
  ``jaxdiff.train.loop``; the batch is already on the device;
* PyTorch: forward, ``loss.backward()``, ``clip_grad_norm_``, ``AdamW.step()``, EMA update by
  ``torch._foreach_lerp_``.

Prints steps/s of each, the ratio jaxdiff / PyTorch, medians over ``--repeats`` timed steps after
``--warmup`` steps, and a JSON line. ``--conv-impl xla`` measures jaxdiff with XLA's native
convolutions instead of the CPU default (``auto``: sub-pixel upsampling conv, and the blocked
kernel gradients outside jaxdiff's compile options; see :mod:`jaxdiff.nets.conv`).

On a GPU machine PyTorch runs on the GPU as well (``--torch-device auto``); ``--dtype bfloat16``
trains jaxdiff's UNet with ``dtype=bfloat16`` and PyTorch's under ``torch.autocast(bfloat16)``
(float32 parameters, optimizer state and loss on both sides).

    python benchmarks/training_vs_torch.py [--batch 32] [--repeats 5] [--conv-impl auto]
        [--dtype float32|bfloat16] [--torch-device auto|cpu|cuda] [--roofline]

``--roofline`` (after the timings) counts the step's model FLOPs as ``mfu.py`` does, measures
jax's float32 4096^2 matmul, and prints both sides' model FLOP/s as fractions of that peak and
the fraction 1.2x PyTorch would need.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def jaxdiff_config(batch: int, conv_impl: str = "auto", unet: dict | None = None):
    """The jaxdiff experiment config of this benchmark (cifar10_ddpm with a smaller UNet)."""
    import ml_collections

    from jaxdiff.config_base import base_config

    c = base_config()
    c.data.image_size, c.data.channels, c.data.batch_size = common.IMAGE_SIZE, common.CHANNELS, batch
    c.model = ml_collections.ConfigDict(dict(unet or common.UNET, conv_impl=conv_impl))
    c.diffusion.process = {"name": "discrete_vp", "beta_schedule": "linear", "beta_start": 1e-4,
                           "beta_end": 0.02}
    c.diffusion.prediction = "epsilon"
    c.optim.lr, c.optim.warmup_steps, c.optim.grad_clip = 2e-4, 0, 1.0
    c.ema.decays = (0.999,)
    return c


def jaxdiff_train_step(batch: int, conv_impl: str = "auto", unet: dict | None = None):
    """``(step_fn, state, batch_dict, n_params)``: the jitted, donating trainer step and inputs."""
    import jax
    import numpy as np

    from jaxdiff import compile_options
    from jaxdiff.modeling import build_model
    from jaxdiff.train.loop import make_init_fn
    from jaxdiff.train.state import make_optimizer
    from jaxdiff.train.step import make_train_step

    config = jaxdiff_config(batch, conv_impl, unet)
    model = build_model(config)
    tx = make_optimizer(config)
    state = jax.jit(make_init_fn(config, model, tx))(jax.random.PRNGKey(0))
    step_fn = compile_options.jit(make_train_step(config, model, tx), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    data = {
        "image": jax.device_put(rng.standard_normal((batch, common.IMAGE_SIZE, common.IMAGE_SIZE,
                                                     common.CHANNELS), np.float32)),
        "label": jax.device_put(np.zeros((batch,), np.int32)),
    }
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(state.params)))
    return step_fn, state, data, n_params


def bench_jaxdiff(batch: int, repeats: int, warmup: int, conv_impl: str,
                  dtype: str = "float32") -> dict:
    import jax

    step_fn, state, data, n_params = jaxdiff_train_step(batch, conv_impl,
                                                        dict(common.UNET, dtype=dtype))
    box = [state]

    def one():
        box[0], metrics = step_fn(box[0], data)
        return metrics["loss"]

    t = common.median_time(one, repeats=repeats, warmup=warmup)
    loss = float(jax.device_get(one()))
    return dict(t, steps_per_s=1.0 / t["median_s"], params=n_params, final_loss=loss)


def bench_torch(batch: int, repeats: int, warmup: int, device: str = "cpu",
                dtype: str = "float32") -> dict:
    torch = common.setup_torch()
    from diffusers import UNet2DModel

    dev = common.torch_device(device)
    net = UNet2DModel(**common.diffusers_unet_config()).train().to(dev)
    ema = [p.detach().clone() for p in net.parameters()]
    # fused AdamW where PyTorch has it for the device (CUDA): its fastest optimizer step
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, fused=dev.type == "cuda" or None)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0).float().to(dev)
    x0 = torch.randn(batch, common.CHANNELS, common.IMAGE_SIZE, common.IMAGE_SIZE).to(dev)
    params = list(net.parameters())

    def one():
        t = torch.randint(0, 1000, (batch,), device=dev)
        eps = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with common.torch_autocast(dev, dtype):
            out = net(xt, t).sample
        loss = torch.mean((out.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - 0.999)
        return loss.item()

    t = common.median_time(one, repeats=repeats, warmup=warmup)
    return dict(t, steps_per_s=1.0 / t["median_s"], params=common.count_torch_params(net),
                final_loss=float(one()), device=str(dev))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--conv-impl", default="auto", choices=("auto", "xla", "matmul"))
    common.add_precision_args(ap)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--roofline", action="store_true",
                    help="also measure jax's float32 matmul peak (4096^2) and count the step's "
                         "model FLOPs, and print each side's model FLOP/s as a fraction of that "
                         "peak, with the fraction 1.2x PyTorch would need")
    ap.add_argument("--json", default=None, help="append the JSON line to this file")
    args = ap.parse_args(argv)
    if args.roofline and args.skip_torch:
        ap.error("--roofline compares with PyTorch's step: drop --skip-torch")
    import jax

    info = common.machine_info()
    common.log(f"machine: {info}")
    jx = bench_jaxdiff(args.batch, args.repeats, args.warmup, args.conv_impl, args.dtype)
    common.log(f"jaxdiff ({args.conv_impl}): {jx['params']:,} params, "
               f"{jx['steps_per_s']:.3f} steps/s (median {jx['median_s']:.3f} s, {jx['times_s']})")
    result = dict(benchmark="training_vs_torch", batch=args.batch, conv_impl=args.conv_impl,
                  dtype=args.dtype, unet=common.UNET, jaxdiff=jx, machine=info)
    if not args.skip_torch:
        th = bench_torch(args.batch, args.repeats, args.warmup, args.torch_device, args.dtype)
        common.log(f"torch ({th['device']}): {th['params']:,} params, {th['steps_per_s']:.3f} steps/s "
                   f"(median {th['median_s']:.3f} s, {th['times_s']})")
        if th["params"] != jx["params"]:
            common.log(f"WARNING: parameter counts differ: jaxdiff {jx['params']:,} vs "
                       f"torch {th['params']:,}")
        result["torch"] = th
        result["params_equal"] = th["params"] == jx["params"]
        result["ratio_jaxdiff_over_torch"] = jx["steps_per_s"] / th["steps_per_s"]
        common.log(f"ratio jaxdiff / torch (steps/s): {result['ratio_jaxdiff_over_torch']:.2f}x "
                   f"(target >= 1.2x)")
        if args.roofline:
            # model FLOPs: those of the network as defined, i.e. of the conv_impl="xla" step (as mfu.py)
            ref_fn, ref_state, ref_data, _ = jaxdiff_train_step(
                args.batch, "xla", dict(common.UNET, conv_impl="xla", dtype=args.dtype))
            lowered = ref_fn.lower(ref_state, ref_data)
            # on an accelerator the optimised executable's library calls may go uncounted (mfu.py)
            flops = (common.compiled_flops(lowered.compile()) if jax.default_backend() == "cpu"
                     else common.hlo_flops(lowered))
            del ref_fn, ref_state, ref_data
            peak = common.matmul_peak_jax(4096, 3)
            result["roofline"] = common.roofline(
                "train step", flops, {"jaxdiff": jx["median_s"], "torch": th["median_s"]}, peak,
                "torch", 1.2)
    result["load_avg_end"] = common.load_average()
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
