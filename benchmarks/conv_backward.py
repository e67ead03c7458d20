"""Convolution forward / input gradient / kernel gradient on XLA:CPU vs PyTorch, per shape.

For each 3x3 convolution shape of the benchmark UNet (``common.UNET``: 64 channels at 32x32,
128 at 16x16 / 8x8 / 4x4, batch 32) and the issue's 128-channel 32x32 case, times (medians):

* jax: the forward conv, the input gradient, the kernel gradient by XLA's native lowering and by
  jaxdiff's blocked matmuls (:mod:`jaxdiff.nets.conv`, ``impl="matmul"``; JSON key ``jax_dw_taps``), and what
  ``impl="auto"`` picks;
* torch: ``Conv2d`` forward, and forward + backward (input and kernel gradients).

Then the UNet's upsampling layer (nearest 2x + 3x3 conv) at ``UPSAMPLE_SHAPES``: upsample then
conv, and :func:`jaxdiff.nets.conv.upsample2x_conv3x3`'s sub-pixel form, forward and forward +
backward, against torch's ``interpolate`` + ``Conv2d``.

Prints one JSON line per shape with the ratios ``torch fwd+bwd / jax fwd+dx+dw`` for both kernel
gradients -- the figure that decides ``AUTO_MIN_CHANNELS`` / ``AUTO_MIN_PIXELS``.

Every jax function is compiled with :func:`jaxdiff.compile_options.jit` (on CPU: XLA's own
convolutions instead of YNNPACK's); ``--compile jaxlib-default`` compiles them with jaxlib's
defaults instead (YNNPACK convolutions), the setting under which the blocked kernel gradient was
developed.

    python benchmarks/conv_backward.py [--repeats 5] [--compile jaxdiff|jaxlib-default] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SHAPES = [  # (batch, H, W, C_in, C_out)
    (32, 32, 32, 64, 64),
    (32, 32, 32, 192, 64),
    (32, 32, 32, 128, 128),
    (32, 16, 16, 128, 128),
    (32, 8, 8, 128, 128),
    (32, 4, 4, 128, 128),
]
UPSAMPLE_SHAPES = [(16, 16, 128), (32, 16, 128), (32, 8, 128)]  # (batch, H_in = W_in, C)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", choices=["jaxdiff", "jaxlib-default"], default="jaxdiff")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.compile == "jaxlib-default":
        os.environ["JAXDIFF_CPU_COMPILER_OPTIONS"] = "0"

    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxdiff import compile_options as CO
    from jaxdiff.nets import conv as C

    torch = common.setup_torch()
    dn = ("NHWC", "HWIO", "NHWC")
    common.emit({"benchmark": "conv_backward", "compile": args.compile,
                 "compiler_options": CO.compiler_options(), "machine": common.machine_info()}, args.json)
    for b, h, w, cin, cout in SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (b, h, w, cin))
        k = jax.random.normal(kk, (3, 3, cin, cout)) * 0.05
        g = jax.random.normal(kg, (b, h, w, cout))

        def conv(impl):
            return lambda x, k: C.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, impl=impl)

        # x, k and g are arguments (not closed-over constants) so XLA cannot fold work on them.
        fwd = CO.jit(conv("xla"))
        dx = CO.jit(lambda x, k, g: jax.vjp(conv("xla"), x, k)[1](g)[0])
        dw_native = CO.jit(lambda x, k, g: jax.vjp(conv("xla"), x, k)[1](g)[1])
        dw_taps = CO.jit(lambda x, k, g: jax.vjp(conv("matmul"), x, k)[1](g)[1])
        a = dw_native(x, k, g)
        err = float(jnp.max(jnp.abs(dw_taps(x, k, g) - a)) / jnp.max(jnp.abs(a)))
        t = {name: common.median_time(fn, repeats=args.repeats)["median_s"] for name, fn in [
            ("jax_fwd", lambda: fwd(x, k)), ("jax_dx", lambda: dx(x, k, g)),
            ("jax_dw_native", lambda: dw_native(x, k, g)), ("jax_dw_taps", lambda: dw_taps(x, k, g))]}

        xt = torch.randn(b, cin, h, w, requires_grad=True)
        m = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        gt = torch.randn(b, cout, h, w)

        def t_fwd():
            with torch.no_grad():
                return m(xt)

        def t_fb():
            xt.grad = None
            m.weight.grad = None
            m(xt).backward(gt)

        t["torch_fwd"] = common.median_time(t_fwd, repeats=args.repeats)["median_s"]
        t["torch_fwd_bwd"] = common.median_time(t_fb, repeats=args.repeats)["median_s"]
        jax_native = t["jax_fwd"] + t["jax_dx"] + t["jax_dw_native"]
        jax_taps = t["jax_fwd"] + t["jax_dx"] + t["jax_dw_taps"]
        auto = C.uses_matmul_grad(4, dn) and cin >= C.AUTO_MIN_CHANNELS and cout >= C.AUTO_MIN_CHANNELS \
            and h * w >= C.AUTO_MIN_PIXELS and not CO.cpu_convolutions_on_eigen()
        common.emit({
            "shape_bhwc_cout": [b, h, w, cin, cout],
            **{key: round(v * 1e3, 2) for key, v in t.items()},
            "units": "ms",
            "taps_vs_native_rel_err": float(f"{err:.2e}"),
            "auto_picks": "taps" if auto else "native",
            "ratio_torch_over_jax_native": round(t["torch_fwd_bwd"] / jax_native, 3),
            "ratio_torch_over_jax_taps": round(t["torch_fwd_bwd"] / jax_taps, 3),
            "load_avg": common.load_average(),
        }, args.json)
    upsample_conv(args, torch)


def upsample_conv(args, torch):
    """Nearest 2x upsampling + 3x3 conv (the UNet's upsample layer): direct vs sub-pixel, torch."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxdiff import compile_options as CO
    from jaxdiff.nets import conv as C

    dn = ("NHWC", "HWIO", "NHWC")
    for b, h, c in UPSAMPLE_SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(1), 3)
        x = jax.random.normal(kx, (b, h, h, c))
        k = jax.random.normal(kk, (3, 3, c, c)) * 0.05
        g = jax.random.normal(kg, (b, 2 * h, 2 * h, c))

        def direct(x, k):
            up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return C.conv_general_dilated(up, k, (1, 1), "SAME", dimension_numbers=dn, impl="auto")

        def subpixel(x, k):
            return C.upsample2x_conv3x3(x, k, impl="auto")

        t = {}
        for name, f in (("direct", direct), ("subpixel", subpixel)):
            fw = CO.jit(f)
            fb = CO.jit(lambda x, k, g, f=f: jax.vjp(f, x, k)[1](g))
            t[f"jax_{name}_fwd"] = common.median_time(lambda: fw(x, k), repeats=args.repeats)["median_s"]
            t[f"jax_{name}_fwd_bwd"] = common.median_time(lambda: fb(x, k, g), repeats=args.repeats)["median_s"]
        ref = jax.jit(lambda x, k: lax.conv_general_dilated(
            jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), k, (1, 1), "SAME", dimension_numbers=dn))(x, k)
        err = float(jnp.max(jnp.abs(jax.jit(subpixel)(x, k) - ref)) / jnp.max(jnp.abs(ref)))

        xt = torch.randn(b, c, h, h, requires_grad=True)
        m = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        gt = torch.randn(b, c, 2 * h, 2 * h)
        up = torch.nn.functional.interpolate

        def t_fwd():
            with torch.no_grad():
                return m(up(xt, scale_factor=2.0, mode="nearest"))

        def t_fb():
            xt.grad = None
            m.weight.grad = None
            m(up(xt, scale_factor=2.0, mode="nearest")).backward(gt)

        t["torch_fwd"] = common.median_time(t_fwd, repeats=args.repeats)["median_s"]
        t["torch_fwd_bwd"] = common.median_time(t_fb, repeats=args.repeats)["median_s"]
        common.emit({
            "upsample_conv_bhwc": [b, h, h, c],
            **{key: round(v * 1e3, 2) for key, v in t.items()},
            "units": "ms",
            "subpixel_vs_direct_rel_err": float(f"{err:.2e}"),
            "ratio_torch_over_jax_subpixel_fwd": round(t["torch_fwd"] / t["jax_subpixel_fwd"], 3),
            "ratio_torch_over_jax_subpixel_fwd_bwd": round(t["torch_fwd_bwd"] / t["jax_subpixel_fwd_bwd"], 3),
            "load_avg": common.load_average(),
        }, args.json)


if __name__ == "__main__":
    main()
