"""Memory of decoding a sampling batch of latents: the SD VAE decoder's temporary buffers as XLA
compiles them, for the whole batch at once and for ``decode_batch`` chunks
(:func:`jaxdiff.generate.decode_in_chunks`, ``config.sample.decode_batch``).

Nothing is run or downloaded: the decoder is the SD VAE's architecture (diffusers
``AutoencoderKL`` defaults of ``stabilityai/sd-vae-ft-ema``: 128/256/512/512 channels, 2 layers
per block) with abstract parameters; each program is lowered for 32x32x4 latents (256x256
images) and compiled, and XLA's buffer assignment (``compiled.memory_analysis()``) gives the
temporary bytes. The figures are the compiling backend's (CPU here); a GPU's buffer assignment
differs in detail.

    python benchmarks/decode_memory.py --batch 32 --decode-batch 0,16,8,4,1
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402
from encode_vs_diffusers import SD_VAE  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latent-size", type=int, default=32)
    ap.add_argument("--decode-batch", default="0,16,8,4,1", help="comma-separated; 0 = the whole batch")
    ap.add_argument("--time", action="store_true", help="also run each program (random weights) and time it: "
                    "median of --repeats calls")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from jaxdiff import compile_options, parallel
    from jaxdiff.generate import decode_in_chunks
    from jaxdiff.nets.from_diffusers import vae_fields
    from jaxdiff.nets.vae import AutoencoderKL

    fields, scaling = vae_fields(SD_VAE)
    vae = AutoencoderKL(**fields)
    mesh = parallel.make_mesh()
    s = args.latent_size
    z = jax.ShapeDtypeStruct((args.batch, s, s, fields.get("latent_channels", 4)), jnp.float32,
                             sharding=parallel.batch_sharding(mesh))
    params = jax.eval_shape(lambda: vae.init(jax.random.key(0), jnp.zeros((1, 8 * s, 8 * s, 3)))["params"])
    n_params = sum(int(p.size) for p in jax.tree.leaves(params))
    info = common.machine_info()
    print(f"SD VAE architecture, {n_params:,} params; batch {args.batch} of {s}x{s} latents; {info['jax_devices']}",
          file=sys.stderr)
    real = latents = None
    for db in (int(v) for v in args.decode_batch.split(",")):
        def decode(p, z, db=db):
            return decode_in_chunks(lambda c: vae.apply({"params": p}, c / scaling, method=vae.decode), z, db, mesh)

        t0 = time.perf_counter()
        compiled = compile_options.jit(decode).lower(params, z).compile()
        mem = compiled.memory_analysis()
        row = {"benchmark": "decode_memory", "batch": args.batch, "latent_size": s, "decode_batch": db,
               "temp_bytes": int(mem.temp_size_in_bytes), "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
               "output_bytes": int(mem.output_size_in_bytes), "compile_s": round(time.perf_counter() - t0, 1)}
        if args.time:
            if real is None:
                real = vae.init(jax.random.key(0), jnp.zeros((1, 8 * s, 8 * s, 3)))["params"]
                latents = jax.device_put(jax.random.normal(jax.random.key(1), z.shape), z.sharding)
            t = common.median_time(lambda: compiled(real, latents), repeats=args.repeats)
            row["seconds"] = round(t["median_s"], 3)
            row["images_per_s"] = round(args.batch / t["median_s"], 3)
        common.emit({**row, **info}, args.json)


if __name__ == "__main__":
    main()
