"""Encoding throughput: jaxdiff's jitted SD-VAE encoder vs diffusers' ``AutoencoderKL.encode``, same run.

The network is the SD VAE's architecture (diffusers ``AutoencoderKL`` defaults of
``stabilityai/sd-vae-ft-ema``: widths 128, 256, 512, 512, two residual blocks per level, attention
in the middle, 4 latent channels; 83.7M parameters), randomly initialised (no download) and
saved once as safetensors; jaxdiff loads that folder as ``jaxdiff encode`` does. Timed, at
``--image-size`` (256: DiT's 32x32x4 latents):

* ``encoder``: one encoder call on a batch of ``--batch`` images, the posterior mean and std
  returned to the host -- jaxdiff ``jaxdiff.encode.make_encode_fn(flip=False)`` vs diffusers
  ``vae.encode(x).latent_dist`` under ``torch.inference_mode()``; ratio of images/s;
* ``pipeline`` (jaxdiff only, ``--pipeline N``): ``jaxdiff.encode.encode_images`` over an
  ImageFolder of N generated 320x400 PNGs (decode, ADM crop, encoder with flips, writing),
  images/s (each image is encoded twice: as it is and mirrored).

The values of the two encoders are compared as well (max relative difference of the means).

    python benchmarks/encode_vs_diffusers.py [--batch 4] [--repeats 3] [--image-size 256] [--pipeline 16]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--pipeline", type=int, default=16, help="images of the jaxdiff pipeline run (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    torch = common.setup_torch()
    from diffusers import AutoencoderKL as TorchVAE

    from jaxdiff.encode import encode_images, make_encode_fn
    from jaxdiff.nets.from_diffusers import load_vae
    from jaxdiff.nets.vae import AutoencoderKL

    info = common.machine_info()
    common.log(f"machine: {info}")
    tmp = tempfile.mkdtemp(prefix="encode_bench_")
    ref = TorchVAE(**SD_VAE).eval()
    ref.save_pretrained(os.path.join(tmp, "vae"), safe_serialization=True)
    n_params = common.count_torch_params(ref)
    fields, params, scaling = load_vae(os.path.join(tmp, "vae"))
    model = AutoencoderKL(**fields)
    fn = make_encode_fn(model, scaling, flip=False)
    rng = np.random.default_rng(0)
    s = args.image_size
    images = rng.integers(0, 256, (args.batch, s, s, 3), dtype=np.uint8)

    jx = common.median_time(lambda: jax.device_get(fn(params, images)), repeats=args.repeats, warmup=1)
    common.log(f"jaxdiff encoder: {args.batch / jx['median_s']:.2f} images/s (median {jx['median_s']:.3f} s, "
               f"{jx['times_s']}, first call {jx['warmup_s']})")
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)

    def torch_encode():
        with torch.inference_mode():
            dist = ref.encode(x).latent_dist
            return dist.mean.numpy(), dist.std.numpy()

    th = common.median_time(torch_encode, repeats=args.repeats, warmup=1)
    common.log(f"diffusers encoder: {args.batch / th['median_s']:.2f} images/s (median {th['median_s']:.3f} s, "
               f"{th['times_s']})")
    mean_j = np.asarray(fn(params, images)[0])[:, 0] / scaling
    mean_t = torch_encode()[0].transpose(0, 2, 3, 1)
    diff = float(np.abs(mean_j - mean_t).max() / np.abs(mean_t).max())
    ratio = th["median_s"] / jx["median_s"]
    common.log(f"ratio jaxdiff / diffusers (images/s): {ratio:.2f}x; means differ by {diff:.2e} (relative)")
    result = dict(benchmark="encode_vs_diffusers", params=n_params, batch=args.batch, image_size=s,
                  jaxdiff=jx, diffusers=th, ratio_jaxdiff_over_diffusers=ratio, max_rel_diff_mean=diff, machine=info)
    if args.pipeline:
        from PIL import Image

        from jaxdiff.data.images import ImageFolderImages

        for i in range(args.pipeline):
            d = os.path.join(tmp, "images", f"class_{i % 4}")
            os.makedirs(d, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (320, 400, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
        summary = encode_images(ImageFolderImages(os.path.join(tmp, "images")), os.path.join(tmp, "vae"),
                                os.path.join(tmp, "latents"), image_size=s, batch_size=args.batch, progress=False)
        common.log(f"jaxdiff pipeline (decode + crop + encode with flips + write, compile included): "
                   f"{summary['images_per_s']:.2f} images/s over {args.pipeline} images ({summary['seconds']:.1f} s)")
        result["pipeline"] = {k: summary[k] for k in ("num_images", "seconds", "images_per_s")}
    result["load_avg_end"] = common.load_average()
    shutil.rmtree(tmp, ignore_errors=True)
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
