"""``jaxdiff encode``: an image dataset -> a latent dataset (:mod:`jaxdiff.data.latents`) under a
diffusers ``AutoencoderKL`` (e.g. a local copy of ``stabilityai/sd-vae-ft-ema``, the VAE of DiT).

Every image is cropped as ADM / DiT crop ImageNet (:func:`jaxdiff.data.images.center_crop_arr`),
mapped to [-1, 1], and encoded together with its mirror image (``flip=True``, the default:
DiT trains with random horizontal flips). The posterior mean and standard deviation of both,
times the VAE's ``scaling_factor``, are written in order; the training step then draws
``z = mean + std * noise`` each step, as DiT's ``vae.encode(x).latent_dist.sample() * 0.18215``.

The encoder runs jit-compiled with the batch split over this process's devices; Pillow decodes
and crops the next batch in a thread pool while the devices encode the current one. An
interrupted run continues where it stopped when started again with the same arguments (the
written count is committed with the arrays every ``commit_every`` batches).

Reference: Rombach et al. 2022 (latent diffusion, the KL autoencoder); Peebles & Xie 2023 (DiT,
``train.py``: ADM centre crop, random flip, posterior draw scaled by 0.18215).
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import compile_options, parallel
from jaxdiff.data.images import ImageFolderImages, TfdsImages, center_crop_arr
from jaxdiff.data.latents import LatentWriter

__all__ = ["DTYPES", "encode_images", "make_encode_fn"]

DTYPES = ("float32", "float16")
"""Storage dtypes of the posterior means (the stds are always float32). ImageNet's 1.28M images
with flips at 32x32x4 take 84 GB (means and stds in float32) or 63 GB (float16 means). float16
rounds each mean by up to ~5e-4 of its magnitude, which for a near-deterministic encoder such as
the SD VAE (small posterior stds) can exceed the posterior's own spread: with float16 the model
trains on rounded means."""


def make_encode_fn(model, scaling_factor: float, flip: bool, mesh=None):
    """A jitted ``(params, images uint8 (B, H, W, 3)) -> (mean, std)``, each ``(B, V, h, w, C)``
    float32 and scaled by ``scaling_factor``; view 1 (with ``flip``) is the mirrored image's.

    With ``mesh`` the batch is split over its devices (``B`` must divide by their number)."""

    def encode(params, images):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        b = images.shape[0]
        views = 2 if flip else 1
        if flip:  # image i and its mirror next to each other: rows stay on the device that holds image i
            x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(views * b, *x.shape[1:])
        mean, logvar = model.apply({"params": params}, x, method=model.encode)
        std = jnp.exp(0.5 * logvar)

        def per_view(a):
            return a.reshape(b, views, *a.shape[1:]) * scaling_factor

        return per_view(mean), per_view(std)

    if mesh is None:
        return compile_options.jit(encode)
    data = parallel.batch_sharding(mesh)
    return compile_options.jit(encode, in_shardings=(parallel.replicated(mesh), data), out_shardings=(data, data))


def _vae_settings(vae_dir: str, fields: dict, scaling: float) -> dict:
    files = sorted(f for f in os.listdir(vae_dir) if f.endswith((".safetensors", ".bin", ".json")))
    return {"path": os.path.abspath(vae_dir), "fields": fields, "scaling_factor": scaling,
            "files": {f: os.path.getsize(os.path.join(vae_dir, f)) for f in files}}


def encode_images(images: Any, vae_dir: str, out: str, *, split: str = "train", image_size: int = 256,
                  batch_size: int = 32, flip: bool = True, dtype: str = "float32", limit: int = 0,
                  progress: bool = True, workers: int | None = None, commit_every: int = 8) -> dict:
    """Encodes ``images`` (an :class:`~jaxdiff.data.images.ImageFolderImages`, a
    :class:`~jaxdiff.data.images.TfdsImages` or any object with ``len``, ``read(i) -> (image,
    label)`` and ``describe()``) into the latent dataset ``<out>/<split>``.

    Args:
      vae_dir: a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors weights).
      image_size: side of the centre crop the encoder sees (256 for DiT's 32x32x4 latents).
      batch_size: images per encoder call (padded at the end; must divide by the local devices).
      flip: also store the mirrored image's posterior (the dataset then has ``2 N`` examples).
      dtype: ``"float32"`` or ``"float16"`` storage of the means (:data:`DTYPES`).
      limit: encode only the first ``limit`` images (0: all).
      workers: decoding threads (default: ``min(16, cpu_count)``).
      commit_every: batches between commits of the written count (what a restart resumes from).

    Returns:
      A summary: the split's directory, counts, latent shape, images encoded by this call, their
      rate, and the mean / std of the scaled posterior means encoded by this call (a check of the
      scaling factor: latent diffusion picks it so that the latents have unit variance).
    """
    from tqdm.auto import tqdm

    from jaxdiff.nets.from_diffusers import load_vae
    from jaxdiff.nets.vae import AutoencoderKL

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if jax.process_count() > 1:
        raise ValueError("jaxdiff encode runs in one process (it splits each batch over that process's devices)")
    if image_size < 1 or batch_size < 1 or limit < 0 or commit_every < 1:
        raise ValueError(f"image_size, batch_size and commit_every must be positive and limit >= 0; got "
                         f"{image_size}, {batch_size}, {commit_every}, {limit}")
    devices = jax.local_devices()
    if batch_size % len(devices):
        raise ValueError(f"batch_size={batch_size} is not divisible by the {len(devices)} local devices")
    fields, params, scaling = load_vae(vae_dir)
    factor = 2 ** (len(fields["block_out_channels"]) - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not divisible by the VAE's downsampling factor {factor}")
    model = AutoencoderKL(**fields)
    n = len(images) if not limit else min(int(limit), len(images))
    if n == 0:
        raise ValueError("no images to encode")
    views = ["image", "hflip"] if flip else ["image"]
    latent_shape = (image_size // factor, image_size // factor, int(fields["latent_channels"]))
    settings = {"vae": _vae_settings(vae_dir, fields, scaling), "source": images.describe(),
                "image_size": int(image_size), "crop": "adm_center_crop", "limit": int(limit)}
    classes = getattr(images, "classes", None)
    if classes and set(classes) & {"train", "val", "validation", "test"}:
        raise ValueError(f"the image folder's classes are {classes[:5]}{'...' if len(classes) > 5 else ''}: "
                         "that looks like a dataset root with split folders; pass the split's folder "
                         "(e.g. --image_folder imagenet/train)")
    writer = LatentWriter(out, split, settings, n, views, latent_shape, dtype, scaling)
    start = writer.num_done
    summary = {"dir": writer.dir, "num_images": n, "views": views, "num_examples": n * len(views),
               "latent_shape": list(latent_shape), "dtype": dtype, "scaling_factor": scaling,
               "resumed_from": start, "encoded_now": n - start}
    if start >= n:
        writer.close()
        return summary

    mesh = parallel.make_mesh(devices=devices)
    fn = make_encode_fn(model, scaling, flip, mesh)
    params = jax.device_put(params, parallel.replicated(mesh))

    def load(i):
        try:
            image, label = images.read(i)
            return center_crop_arr(image, image_size), label
        except Exception as e:  # noqa: BLE001 -- a corrupt or unreadable file: say which
            where = images.paths[i] if hasattr(images, "paths") else f"example {i} of {images.describe()}"
            raise ValueError(f"cannot read image {where}: {type(e).__name__}: {e}") from e

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1))

    def submit(lo):
        return [pool.submit(load, i) for i in range(lo, min(lo + batch_size, n))]

    total, total_sq, count = 0.0, 0.0, 0
    t0 = time.perf_counter()
    batches = 0
    pbar = tqdm(total=n, initial=start, desc="encoding", unit="img", disable=not progress, dynamic_ncols=True)
    try:
        pending = submit(start)
        while start < n:
            loaded = [f.result() for f in pending]
            stop = start + len(loaded)
            pending = submit(stop) if stop < n else []
            x = np.stack([a for a, _ in loaded])
            labels = np.asarray([lab for _, lab in loaded], np.int32)
            if len(x) < batch_size:  # one compiled shape: pad the last batch, drop the padding after
                x = np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])
            mean, std = jax.device_get(fn(params, x))
            mean, std = mean[:len(labels)], std[:len(labels)]
            writer.write(start, mean.astype(dtype), std, labels)
            batches += 1
            total += float(np.sum(mean[:, 0], dtype=np.float64))
            total_sq += float(np.sum(np.square(mean[:, 0], dtype=np.float64)))
            count += mean[:, 0].size
            start = stop
            if batches % commit_every == 0 or start >= n:
                writer.commit(start)
            pbar.update(len(labels))
    finally:
        pbar.close()
        pool.shutdown(wait=False, cancel_futures=True)
        if start > writer.num_done:  # stopped by an error or a kill: keep what is on disk (rows < start)
            writer.commit(start)
        writer.close()
    seconds = time.perf_counter() - t0
    mu = total / count
    summary.update(seconds=round(seconds, 3), images_per_s=round((n - summary["resumed_from"]) / seconds, 2),
                   latent_mean=mu, latent_std=float(np.sqrt(max(total_sq / count - mu * mu, 0.0))))
    return summary


def image_reader(image_folder: str = "", tfds: str = "", split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str = "label"):
    """The image reader of ``jaxdiff encode``: exactly one of ``image_folder`` and ``tfds``."""
    if bool(image_folder) == bool(tfds):
        raise ValueError("give exactly one of --image_folder (ImageFolder layout: root/<class>/<image>) and --tfds NAME")
    if image_folder:
        return ImageFolderImages(image_folder)
    return TfdsImages(tfds, split=split, data_dir=data_dir or None, image_key=image_key, label_key=label_key)
