"""Generate samples from a trained model: a jitted, batch-sharded sampling loop.

``make_sample_fn`` compiles once per (sampler, number of steps, batch shape); every batch after
the first reuses the executable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import compile_options, guidance, parallel, samplers
from jaxdiff.config_base import check_sample_vae
from jaxdiff.parameterization import check_x0_recoverable
from jaxdiff.modeling import (build_process, conditional_denoiser, data_shape, denoiser, learns_variance, null_labels,
                              num_classes)
from jaxdiff.schedules import make_grid

__all__ = ["make_sample_fn", "sample_nfe", "decode_in_chunks", "generate", "class_labels", "guidance_settings",
           "ddpm_variance"]


def guidance_settings(config, override: dict | None = None) -> dict:
    """``{"scale", "interval", "rescale", "channels"}`` of classifier-free guidance from
    ``config.sample`` (``guidance_scale``, ``guidance_interval``, ``guidance_rescale``,
    ``guidance_channels``: 0 = all), updated by ``override``."""
    sc = config.get("sample") or {}
    g = {"scale": float(sc.get("guidance_scale", 1.0)),
         "interval": tuple(sc.get("guidance_interval", ()) or ()) or None,
         "rescale": float(sc.get("guidance_rescale", 0.0)),
         "channels": int(sc.get("guidance_channels", 0) or 0) or None}
    g.update(override or {})
    if g["interval"] is not None and len(g["interval"]) != 2:
        raise ValueError(f"sample.guidance_interval must be () or (lo, hi), got {g['interval']!r}")
    return g


def ddpm_variance(config, override: str | None = None) -> str:
    """The reverse variance ``ddpm`` uses for ``config``: ``override``, else ``config.sample.variance``,
    else ``learned_range`` for a model trained with ``diffusion.variance="learned_range"``, else
    ``fixed_small``."""
    sc = config.get("sample") or {}
    return (override or str(sc.get("variance", "") or "")
            or ("learned_range" if learns_variance(config) else "fixed_small"))


def warn_if_null_class_untrained(config) -> None:
    """Warn when guidance is asked of a model trained without label dropout: its unconditional
    branch (the null class, Ho & Salimans 2022) never saw a training step."""
    dropout = (config.get("diffusion") or {}).get("class_dropout", None)
    if dropout is not None and float(dropout) <= 0.0:
        warnings.warn("classifier-free guidance on a model trained with config.diffusion.class_dropout=0: "
                      "its null-class (unconditional) branch was never trained, so the guided samples "
                      "extrapolate from an untrained direction", RuntimeWarning, stacklevel=3)


def make_sample_fn(config, model, sampler: str, num_steps: int, batch: int, *, grid_kind=None,
                   mesh=None, guidance_override: dict | None = None, decode_batch: int | None = None, **options):
    """``sample(params, key, y) -> images`` for one batch, jitted (``.lower`` works); images
    sharded over the mesh.

    Classifier-free guidance follows ``config.sample.guidance_*`` (or ``guidance_override``, e.g.
    ``{"scale": 3.0}``); at scale 1 the conditional model runs alone. The time grid is
    ``grid_kind``, else ``config.sample.grid``, else the process's default; ``ddpm`` and ``ddim``
    clip x0_hat to ``+-config.sample.clip_denoised`` when it is > 0 (unless ``options`` say), and
    ``ddim``'s last step lands on t = 0 instead of clean data when ``config.sample.set_alpha_to_one``
    is False (:func:`end_at_t_min`).
    ``ddpm``'s reverse variance is ``config.sample.variance``, else the learned one for a model
    trained with ``diffusion.variance="learned_range"`` (iDDPM, DiT), else ``fixed_small``; the
    other samplers use the prediction channels only.
    With ``config.sample.vae`` (a diffusers ``AutoencoderKL`` folder) the samples are latents and
    the function returns their decoding, ``decode(latents / scaling_factor)``, in the same jit
    (Rombach et al. 2022; DiT's sampling). ``decode_batch`` (default ``config.sample.decode_batch``;
    0 = the whole batch at once) bounds how many latents each device decodes at a time: the batch
    is decoded in a ``lax.map`` over equal chunks, each device decoding its own latents, so the
    decoder's activation memory follows ``decode_batch`` rather than the sampling batch (see
    :func:`decode_in_chunks`). ``return_nfe=True`` (adaptive samplers, e.g. ``pf_ode_adaptive``)
    makes the function return ``(images, nfe)``, the model calls the batch took."""
    fn = samplers.get(sampler)
    if options.get("return_nfe"):
        from jaxdiff.samplers.nfe import ADAPTIVE

        if sampler not in ADAPTIVE:
            raise ValueError(f"return_nfe is an option of the adaptive samplers ({', '.join(ADAPTIVE)}), not of "
                             f"{sampler!r}: count its NFE with generate.sample_nfe")
    process = build_process(config)
    sc = config.get("sample") or {}
    grid, options = _grid_and_options(config, process, sampler, num_steps, grid_kind, options)
    with_variance = options.get("variance") == "learned_range"
    if with_variance and not learns_variance(config):
        raise ValueError("ddpm with variance='learned_range' needs a model trained with "
                         "config.diffusion.variance='learned_range' (2C output channels)")
    shape = (batch,) + data_shape(config)
    mesh = mesh or parallel.make_mesh()
    out_sharding = parallel.batch_sharding(mesh)
    g = guidance_settings(config, guidance_override)
    guided = g["scale"] != 1.0
    if guided and num_classes(config) == 0:
        raise ValueError(f"sample.guidance_scale={g['scale']} needs a class-conditional model "
                         "(model.num_classes > 0 trained with diffusion.class_dropout > 0); this one is unconditional")
    if guided:
        warn_if_null_class_untrained(config)

    check_sample_vae(config)  # the VAE's latents have the data's channels (a clear error, not Flax's)
    vae = _vae(sc.get("vae", ""))
    if decode_batch is None:
        decode_batch = int(sc.get("decode_batch", 0) or 0)
    if int(decode_batch) < 0:
        raise ValueError(f"decode_batch={decode_batch}: the number of latents a device decodes at a time must be "
                         ">= 0 (0 = the whole batch)")

    def sample(params, key, y, vae_params=None):
        k_init, k_sampler = jax.random.split(key)
        x = jax.lax.with_sharding_constraint(grid.prior_sample(k_init, shape), out_sharding)
        if guided and y is None:
            raise ValueError(f"guidance scale {g['scale']} needs class labels: call sample(params, key, y) "
                             "with y of shape (batch,), or sample with guidance scale 1")
        if guided:
            d = guidance.classifier_free_guidance(
                conditional_denoiser(config, model, params, with_variance=with_variance), y,
                null_labels(config, y.shape[0]), g["scale"], interval=g["interval"], rescale=g["rescale"],
                process=process, channels=g["channels"])
        else:
            d = denoiser(config, model, params, y, with_variance=with_variance)
        x = fn(d, x, grid, key=k_sampler, **options)
        nfe = None
        if options.get("return_nfe"):  # an adaptive sampler's (x, model calls of this batch)
            x, nfe = x
        if vae is not None:  # latent diffusion: decode latents / scaling_factor to images
            x = decode_in_chunks(
                lambda z: vae.model.apply({"params": vae_params}, z / vae.scaling_factor, method=vae.model.decode),
                x, int(decode_batch), mesh)
        return x if nfe is None else (x, nfe)

    if options.get("return_nfe"):
        jitted = compile_options.jit(sample, out_shardings=(out_sharding, parallel.replicated(mesh)))
    else:
        jitted = compile_options.jit(sample, out_shardings=out_sharding)
    if vae is None:
        return jitted
    return _WithVAEParams(jitted, _on_mesh(vae.params, mesh))


def _grid_and_options(config, process, sampler: str, num_steps: int, grid_kind, options: dict):
    """The time grid and the sampler's options as ``make_sample_fn`` runs them: ``grid_kind`` or
    ``config.sample.grid``; ``ddpm`` / ``ddim`` clipping and ``ddpm``'s variance from the config."""
    sc = config.get("sample") or {}
    grid = make_grid(process, int(num_steps), grid_kind or sc.get("grid") or None)
    check_x0_recoverable(config.diffusion.prediction, process, float(grid.t[0]),
                         " (the first time of the sampling grid)")
    if sampler == "ddim" and not bool(sc.get("set_alpha_to_one", True)):
        grid = end_at_t_min(grid)
    options = dict(options)
    clip = float(sc.get("clip_denoised", 0.0) or 0.0)
    if clip > 0 and sampler in ("ddpm", "ddim"):
        options.setdefault("clip_denoised", clip)
    if sampler == "ddpm":
        options.setdefault("variance", ddpm_variance(config))
    elif options.get("variance"):
        raise ValueError(f"variance={options['variance']!r} is an option of the ddpm sampler, not of {sampler!r}")
    return grid, options


def end_at_t_min(grid):
    """``grid`` with its final clean point (alpha 1, sigma 0) replaced by the process at t = 0: the
    last DDIM step of diffusers' ``DDIMScheduler(set_alpha_to_one=False)`` (``final_alpha_cumprod =
    alphas_cumprod[0]``). With "leading" timesteps, which already end at t = 0, that last step is
    from t = 0 to t = 0, as in diffusers (for DDIM x is unchanged unless x0_hat is clipped)."""
    process = grid.process
    if not getattr(process, "discrete", False):
        raise ValueError("sample.set_alpha_to_one=False (diffusers' DDIM final step onto alphas_cumprod[0]) "
                         f"needs a discrete_vp process, not {type(process).__name__}")
    if float(grid.sigma[-1]) != 0.0:
        raise ValueError("sample.set_alpha_to_one=False: the grid does not end at clean data")
    t0 = jnp.zeros((1,), grid.t.dtype)
    return dataclasses.replace(grid, t=jnp.concatenate([grid.t[:-1], t0]),
                               alpha=jnp.concatenate([grid.alpha[:-1], process.alpha(t0).astype(grid.alpha.dtype)]),
                               sigma=jnp.concatenate([grid.sigma[:-1], process.sigma(t0).astype(grid.sigma.dtype)]))


def sample_nfe(config, sampler: str, num_steps: int, *, grid_kind=None, **options) -> int | None:
    """Denoiser evaluations per sample of ``make_sample_fn(config, ..., sampler, num_steps, ...)``
    (the NFE of the papers' tables; :func:`jaxdiff.samplers.nfe.count_nfe` on the same grid and
    options); None for an adaptive sampler, whose NFE depends on the model. Classifier-free
    guidance runs both branches in one call per evaluation and does not change it."""
    from jaxdiff.samplers.nfe import ADAPTIVE, count_nfe

    if sampler in ADAPTIVE:
        return None
    options.pop("decode_batch", None)
    grid, options = _grid_and_options(config, build_process(config), sampler, num_steps, grid_kind, options)
    if options.get("variance") == "learned_range":  # one evaluation per step with any variance; the
        options["variance"] = "fixed_small"         # stand-in denoiser has no variance channels
    return count_nfe(sampler, grid, **options)


def decode_in_chunks(decode, x, decode_batch: int, mesh):
    """``decode(x)`` for a batch ``x`` sharded over ``mesh`` along its leading axis (as the sampler
    leaves it), computed in a ``lax.map`` over chunks in which each device decodes at most
    ``decode_batch`` of its rows (0, or at least the rows per device: one call), so that only one
    chunk's activations are live at a time.

    The rows per device are split into the fewest equal chunks of at most ``decode_batch``
    (a block they do not divide is padded with copies of its last row, whose decodings are
    dropped); chunk ``i`` takes the ``i``-th piece of every device's own block, so every device
    decodes its own latents and nothing moves between devices. Row ``j`` of the result is
    ``decode`` of row ``j`` up to the floating-point effects of a different batch size."""
    n_total = x.shape[0]
    n_dev = mesh.size
    if n_total % n_dev:
        raise ValueError(f"batch {n_total} is not a multiple of the {n_dev} devices it is sharded over")
    per_dev = n_total // n_dev
    if decode_batch <= 0 or decode_batch >= per_dev:
        return decode(x)
    n_chunks = -(-per_dev // decode_batch)
    size = -(-per_dev // n_chunks)                          # equal chunks, as little padding as possible
    pad = n_chunks * size - per_dev
    blocks = x.reshape((n_dev, per_dev) + x.shape[1:])
    if pad:
        blocks = jnp.concatenate([blocks, jnp.repeat(blocks[:, -1:], pad, axis=1)], axis=1)
    spec = jax.sharding.PartitionSpec(None, parallel.BATCH_AXES)
    chunks = blocks.reshape((n_dev, n_chunks, size) + x.shape[1:]).swapaxes(0, 1)
    chunks = jax.lax.with_sharding_constraint(chunks.reshape((n_chunks, n_dev * size) + x.shape[1:]),
                                              jax.sharding.NamedSharding(mesh, spec))
    batch_sharding = parallel.batch_sharding(mesh)
    out = jax.lax.map(lambda c: jax.lax.with_sharding_constraint(decode(c), batch_sharding), chunks)
    out = out.reshape((n_chunks, n_dev, size) + out.shape[2:]).swapaxes(0, 1)
    out = out.reshape((n_dev, n_chunks * size) + out.shape[3:])[:, :per_dev]
    return out.reshape((n_total,) + out.shape[2:])


class _WithVAEParams:
    """The jitted sampler with the VAE's params as its last argument (not constants baked into
    the program): ``(params, key, y)`` like the plain one, and ``lower`` likewise."""

    def __init__(self, jitted, vae_params):
        self.jitted, self.vae_params = jitted, vae_params

    def __call__(self, params, key, y):
        return self.jitted(params, key, y, self.vae_params)

    def lower(self, params, key, y):
        return self.jitted.lower(params, key, y, self.vae_params)


class _VAE(NamedTuple):
    model: Any
    params: Any
    scaling_factor: float


@functools.lru_cache(maxsize=2)
def _vae(path: str) -> _VAE | None:
    """``config.sample.vae``: a local diffusers ``AutoencoderKL`` folder (e.g. a copy of
    ``stabilityai/sd-vae-ft-ema``) whose decoder turns sampled latents into images; "" = none."""
    if not path:
        return None
    from jaxdiff.nets.from_diffusers import load_vae
    from jaxdiff.nets.vae import AutoencoderKL

    fields, params, scaling = load_vae(path)
    return _VAE(AutoencoderKL(**fields), params, scaling)


def _on_mesh(params, mesh):
    """Params as they are if they already live on ``mesh``'s devices (replicated or fsdp-sharded),
    else replicated onto it (e.g. params restored on one device, sampled on eight)."""
    devices = set(mesh.devices.flat)
    replicated = parallel.replicated(mesh)

    def place(p):
        sharding = getattr(p, "sharding", None)
        if sharding is not None and set(sharding.device_set) == devices:
            return p
        return jax.device_put(p, replicated)

    return jax.tree.map(place, params)


def class_labels(config, num: int):
    """Labels 0, 1, ..., C-1, 0, 1, ... for class-conditional models, else None."""
    c = num_classes(config)
    return None if c == 0 else np.arange(num, dtype=np.int32) % c


def generate(config, model, params, num: int, key, *, sampler: str, num_steps: int, batch_size: int = 256,
             labels=None, grid_kind=None, progress: bool = True, mesh=None, **options) -> np.ndarray:
    """``num`` samples as a numpy array, generated in batches (key of batch b: fold_in(key, b))."""
    if options.get("return_nfe"):
        raise ValueError("generate returns the samples only: for an adaptive sampler's NFE use "
                         "make_sample_fn(..., return_nfe=True) or jaxdiff.eval.evaluate_model")
    mesh = mesh or parallel.make_mesh()
    n_dev = mesh.size
    batch = min(int(batch_size), num)
    batch = int(math.ceil(batch / n_dev) * n_dev)
    fn = make_sample_fn(config, model, sampler, num_steps, batch, grid_kind=grid_kind, mesh=mesh, **options)
    params = _on_mesh(params, mesh)
    if labels is None:
        labels = class_labels(config, num)
    out = []
    n_batches = int(math.ceil(num / batch))
    for b in tqdm(range(n_batches), desc=f"sampling ({sampler}, {num_steps} steps)", disable=not progress):
        y = None
        if labels is not None:
            yb = np.resize(np.asarray(labels[b * batch:(b + 1) * batch], np.int32), batch)
            y = jnp.asarray(yb)
        out.append(parallel.gather_to_host(fn(params, jax.random.fold_in(key, b), y)))
    return np.concatenate(out)[:num]
