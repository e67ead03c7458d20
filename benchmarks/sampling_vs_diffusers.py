"""Sampling throughput: jaxdiff's jitted DPM-Solver++(2M) loop vs diffusers, same run.

DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2), 20 steps, batch 16, DDPM linear
betas (T = 1000), epsilon prediction, for two networks:

* ``unet``: the UNet of ``common.UNET`` -- jaxdiff ``UNet`` vs diffusers ``UNet2DModel`` with
  the same channels, blocks and attention (parameter counts printed and checked equal), 32x32x3;
* ``dit``: DiT-S/2 (Peebles & Xie 2023, Table 1: hidden 384, depth 12, 6 heads, patch 2) on
  32x32x4 latents, 1000 classes, learned sigma -- jaxdiff ``dit("S/2")`` vs diffusers
  ``DiTTransformer2DModel``. Same layers and FLOPs up to the conditioning MLP, but diffusers
  re-embeds (t, y) inside every block's ``AdaLayerNormZero`` (its own timestep MLP and label
  table per block), so it has more parameters than the paper's DiT; both counts are printed.

jaxdiff: ``jaxdiff.generate.make_sample_fn`` (the whole loop is one ``lax.scan`` in one jit;
the timed call includes the prior draw). diffusers: ``DPMSolverMultistepScheduler(
algorithm_type="dpmsolver++", solver_order=2)`` and the network in ``torch.inference_mode()``.
Prints images/s, ratio jaxdiff / diffusers, medians over repeats, and a JSON line per model.

    python benchmarks/sampling_vs_diffusers.py [--models unet,dit] [--repeats 2] [--batch 16]
        [--dtype float32|bfloat16] [--torch-device auto|cpu|cuda] [--cpu-devices N]

On a GPU machine diffusers runs on the GPU as well (``--torch-device auto``); ``--dtype
bfloat16`` runs jaxdiff's network with ``dtype=bfloat16`` and diffusers' under
``torch.autocast(bfloat16)``; the solver's arithmetic stays float32 on both sides.

The jaxdiff warm-up is one whole sampling call (it compiles); the diffusers warm-up is one
network call. Defaults keep the whole script under ~4 minutes on the 2-core CI machine.

``--roofline`` also measures jax's float32 4096^2 matmul in the same run and counts the model
FLOPs of the call (``STEPS`` network evaluations, XLA's cost analysis of the network as
defined), and prints each side's model FLOP/s as a fraction of that peak and the fraction that
1.3x diffusers would need (for DiT, diffusers' per-block (t, y) embeddings are extra work on
its side that the count leaves out).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

STEPS, BATCH = 20, 16
DIT = dict(variant="S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)


def jaxdiff_config(model: str, conv_impl: str = "auto", dtype: str = "float32"):
    import ml_collections

    from jaxdiff.config_base import base_config

    c = base_config()
    if model == "unet":
        c.data.image_size, c.data.channels = common.IMAGE_SIZE, common.CHANNELS
        c.model = ml_collections.ConfigDict(dict(common.UNET, conv_impl=conv_impl, dtype=dtype))
    else:
        c.data.image_size, c.data.channels = DIT["input_size"], DIT["in_channels"]
        c.model = ml_collections.ConfigDict(dict(name="dit", dtype=dtype, **DIT))
    c.diffusion.process = {"name": "discrete_vp", "beta_schedule": "linear", "beta_start": 1e-4,
                           "beta_end": 0.02}
    c.diffusion.prediction = "epsilon"
    return c


def bench_jaxdiff(model_name: str, repeats: int, warmup: int, batch: int = BATCH,
                  dtype: str = "float32") -> dict:
    import jax
    import numpy as np

    from jaxdiff.generate import make_sample_fn
    from jaxdiff.modeling import build_model, data_shape, num_classes

    config = jaxdiff_config(model_name, dtype=dtype)
    model = build_model(config)
    shape = (1,) + data_shape(config)
    n_cls = num_classes(config)
    y0 = jax.numpy.zeros((1,), jax.numpy.int32) if n_cls else None
    params = jax.jit(lambda k: model.init(k, jax.numpy.zeros(shape), jax.numpy.zeros((1,)), y0))(
        jax.random.PRNGKey(0))["params"]
    # adaLN-Zero / zero-init output layers make an untrained net output exactly 0; perturb so the
    # timed work is a generic forward pass.
    leaves, tree = jax.tree.flatten(params)
    params = jax.tree.unflatten(tree, [p + 0.01 for p in leaves])
    fn = make_sample_fn(config, model, "dpmpp_2m", STEPS, batch)
    y = jax.numpy.asarray(np.arange(batch, dtype=np.int32) % n_cls) if n_cls else None
    keys = iter(range(10_000))
    t = common.median_time(lambda: fn(params, jax.random.PRNGKey(next(keys)), y),
                           repeats=repeats, warmup=warmup)
    n_params = int(sum(np.prod(p.shape) for p in leaves))
    return dict(t, images_per_s=batch / t["median_s"], params=n_params)


def model_flops_per_eval(model_name: str, batch: int = BATCH, dtype: str = "float32") -> float:
    """Model FLOPs of one network evaluation on ``batch`` inputs: XLA's cost analysis of the
    network as defined (``conv_impl="xla"``: direct convolutions, nearest upsampling then a 3x3
    conv; the CPU default's sub-pixel upsampling executes fewer), compiled on abstract inputs."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.modeling import build_model, data_shape, num_classes

    config = jaxdiff_config(model_name, conv_impl="xla", dtype=dtype)
    model = build_model(config)
    x = jax.ShapeDtypeStruct((batch,) + data_shape(config), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32) if num_classes(config) else None
    params = jax.eval_shape(lambda k, x, t, y: model.init(k, x, t, y), jax.random.PRNGKey(0), x, t, y)
    fn = jax.jit(lambda p, x, t, y: model.apply(p, x, t, y))
    lowered = fn.lower(params, x, t, y)
    if jax.default_backend() != "cpu":  # library calls of the optimised executable may go uncounted (mfu.py)
        return common.hlo_flops(lowered)
    return common.compiled_flops(lowered.compile())


def bench_diffusers(model_name: str, repeats: int, warmup: int, batch: int = BATCH,
                    device: str = "cpu", dtype: str = "float32") -> dict:
    torch = common.setup_torch()
    from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel

    dev = common.torch_device(device)
    if model_name == "unet":
        net = UNet2DModel(**common.diffusers_unet_config()).eval()
        shape = (batch, common.CHANNELS, common.IMAGE_SIZE, common.IMAGE_SIZE)
        labels = None
    else:
        net = DiTTransformer2DModel(
            num_attention_heads=6, attention_head_dim=64, in_channels=DIT["in_channels"],
            out_channels=2 * DIT["in_channels"], num_layers=12, sample_size=DIT["input_size"],
            patch_size=2, num_embeds_ada_norm=DIT["num_classes"], norm_type="ada_norm_zero",
            activation_fn="gelu-approximate", norm_elementwise_affine=False, norm_eps=1e-6,
        ).eval()
        shape = (batch, DIT["in_channels"], DIT["input_size"], DIT["input_size"])
        labels = (torch.arange(batch) % DIT["num_classes"]).to(dev)
    net = net.to(dev)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, prediction_type="epsilon",
    )
    gen = torch.Generator().manual_seed(0)

    def sample():
        with torch.inference_mode():
            sched.set_timesteps(STEPS, device=dev)
            x = torch.randn(shape, generator=gen).to(dev) * sched.init_noise_sigma
            for t in sched.timesteps:
                tb = t.expand(batch)
                with common.torch_autocast(dev, dtype):
                    if labels is None:
                        out = net(x, tb).sample
                    else:
                        out = net(x, timestep=tb, class_labels=labels).sample[:, : shape[1]]
                x = sched.step(out.float(), t, x).prev_sample
            return x.cpu().numpy()  # waits for the device

    if warmup:  # one network call warms PyTorch up; a whole sampling run is not needed
        with torch.inference_mode(), common.torch_autocast(dev, dtype):
            x = torch.randn(shape, generator=gen).to(dev)
            tb = torch.full((batch,), 999, device=dev)
            out = net(x, tb) if labels is None else net(x, timestep=tb, class_labels=labels)
            out.sample.cpu()
    t = common.median_time(sample, repeats=repeats, warmup=0)
    return dict(t, images_per_s=batch / t["median_s"], params=common.count_torch_params(net),
                device=str(dev))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="unet,dit")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--cpu-devices", type=int, default=None,
                    help="run jaxdiff on this many XLA host-platform devices (data-parallel "
                         "shards of the batch on the same cores; sets XLA_FLAGS before jax "
                         "is imported); default: the environment's")
    common.add_precision_args(ap)
    ap.add_argument("--roofline", action="store_true",
                    help="also measure jax's float32 matmul peak (4096^2) and count the model "
                         "FLOPs, and print each side's model FLOP/s as a fraction of that peak, "
                         "with the fraction 1.3x diffusers would need")
    ap.add_argument("--json", default=None, help="append the JSON lines to this file")
    args = ap.parse_args(argv)
    common.set_cpu_devices(args.cpu_devices)
    peak = None
    if args.roofline:
        peak = common.matmul_peak_jax(4096, 3)

    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in ("unet", "dit"):
            raise SystemExit(f"unknown model {name!r}; valid: unet, dit")
        info = common.machine_info()
        common.log(f"[{name}] machine: {info}")
        jx = bench_jaxdiff(name, args.repeats, args.warmup, args.batch, args.dtype)
        common.log(f"[{name}] jaxdiff: {jx['params']:,} params, {jx['images_per_s']:.2f} images/s "
                   f"(median {jx['median_s']:.2f} s, {jx['times_s']}, first call {jx['warmup_s']})")
        th = bench_diffusers(name, args.repeats, args.warmup, args.batch, args.torch_device,
                             args.dtype)
        common.log(f"[{name}] diffusers ({th['device']}): {th['params']:,} params, {th['images_per_s']:.2f} images/s "
                   f"(median {th['median_s']:.2f} s, {th['times_s']})")
        if th["params"] != jx["params"]:
            common.log(f"[{name}] parameter counts differ: jaxdiff {jx['params']:,} vs diffusers "
                       f"{th['params']:,}" + (" (diffusers' DiT embeds t and y in every block)"
                                              if name == "dit" else ""))
        ratio = jx["images_per_s"] / th["images_per_s"]
        common.log(f"[{name}] ratio jaxdiff / diffusers (images/s): {ratio:.2f}x (target >= 1.3x)")
        roof = None
        if peak is not None:
            per_eval = model_flops_per_eval(name, args.batch, args.dtype)
            roof = common.roofline(name, STEPS * per_eval,
                                   {"jaxdiff": jx["median_s"], "diffusers": th["median_s"]},
                                   peak, "diffusers", 1.3)
        common.emit(dict(roofline=roof, benchmark="sampling_vs_diffusers", model=name, sampler="dpmpp_2m",
                         steps=STEPS, batch=args.batch, dtype=args.dtype,
                         cpu_devices=args.cpu_devices, jaxdiff=jx, diffusers=th,
                         params_equal=th["params"] == jx["params"], ratio_jaxdiff_over_diffusers=ratio,
                         config=common.UNET if name == "unet" else DIT, machine=info,
                         load_avg_end=common.load_average()), args.json)


if __name__ == "__main__":
    main()
