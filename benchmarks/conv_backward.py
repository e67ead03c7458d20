"""Convolution forward / input gradient / kernel gradient on XLA:CPU vs PyTorch, per shape.

For each 3x3 convolution shape of the benchmark UNet (``common.UNET``: 64 channels at 32x32,
128 at 16x16 / 8x8 / 4x4, batch 32) and the issue's 128-channel 32x32 case, times (medians):

* jax: the forward conv, the input gradient, the kernel gradient by XLA's native lowering and by
  jaxdiff's tap matmuls (:mod:`jaxdiff.nets.conv`, ``impl="matmul"``), and what
  ``impl="auto"`` picks;
* torch: ``Conv2d`` forward, and forward + backward (input and kernel gradients).

Prints one JSON line per shape with the ratios ``torch fwd+bwd / jax fwd+dx+dw`` for both kernel
gradients -- the figure that decides ``AUTO_MIN_CHANNELS`` / ``AUTO_MIN_PIXELS``.

    python benchmarks/conv_backward.py [--repeats 5] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SHAPES = [  # (batch, H, W, C_in, C_out)
    (32, 32, 32, 64, 64),
    (32, 32, 32, 128, 128),
    (32, 16, 16, 128, 128),
    (32, 8, 8, 128, 128),
    (32, 4, 4, 128, 128),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxdiff.nets import conv as C

    torch = common.setup_torch()
    dn = ("NHWC", "HWIO", "NHWC")
    common.emit({"benchmark": "conv_backward", "machine": common.machine_info()}, args.json)
    for b, h, w, cin, cout in SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (b, h, w, cin))
        k = jax.random.normal(kk, (3, 3, cin, cout)) * 0.05
        g = jax.random.normal(kg, (b, h, w, cout))

        def conv(impl):
            return lambda x, k: C.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, impl=impl)

        fwd = jax.jit(conv("xla"))
        dx = jax.jit(lambda g: jax.vjp(conv("xla"), x, k)[1](g)[0])
        dw_native = jax.jit(lambda g: jax.vjp(conv("xla"), x, k)[1](g)[1])
        dw_taps = jax.jit(lambda g: jax.vjp(conv("matmul"), x, k)[1](g)[1])
        a = dw_native(g)
        err = float(jnp.max(jnp.abs(dw_taps(g) - a)) / jnp.max(jnp.abs(a)))
        t = {name: common.median_time(fn, repeats=args.repeats)["median_s"] for name, fn in [
            ("jax_fwd", lambda: fwd(x, k)), ("jax_dx", lambda: dx(g)),
            ("jax_dw_native", lambda: dw_native(g)), ("jax_dw_taps", lambda: dw_taps(g))]}

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
            and h * w >= C.AUTO_MIN_PIXELS
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


if __name__ == "__main__":
    main()
