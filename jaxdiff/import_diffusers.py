"""``jaxdiff import``: a diffusers DDPM or DiT pipeline folder -> a jaxdiff workdir.

A pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``, or the older flat
layout of ``google/ddpm-cifar10-32``: ``config.json``, ``diffusion_pytorch_model.safetensors``
and ``scheduler_config.json`` side by side; or DiT's ``transformer/``, ``vae/`` and
``scheduler/``, as ``facebook/DiT-XL-2-256``) becomes a workdir that ``jaxdiff sample``,
``jaxdiff eval`` and ``jaxdiff train`` (fine-tuning from step 0) read like one that jaxdiff
trained:

* the network: :mod:`jaxdiff.nets.from_diffusers` (``UNet2DModel`` -> jaxdiff ``UNet``,
  ``DiTTransformer2DModel`` -> jaxdiff ``DiT``); a ``vae/`` becomes ``config.sample.vae``, so
  samples are decoded to images;
* the forward process: the scheduler config's betas (``beta_schedule``, ``beta_start``,
  ``beta_end``, ``num_train_timesteps``, ``trained_betas``, ``rescale_betas_zero_snr``) as
  jaxdiff's ``discrete_vp``, whose time is diffusers' timestep, and its ``prediction_type``;
* a checkpoint at step 0 whose params and every EMA copy are the imported weights (the optimizer
  state is freshly initialised), with the config saved alongside.

Nothing is downloaded; the folder is a local copy (e.g. ``git clone`` of the model repository).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

__all__ = ["import_pipeline", "scheduler_settings"]

# diffusers' schedulers over a discrete beta chain (the ones jaxdiff's discrete_vp is), and the
# defaults of their __init__ arguments for the keys a scheduler_config.json may omit: those of
# DDPMScheduler, except where a class's own differ (_CLASS_DEFAULTS; diffusers 0.42.1, checked
# against each class's signature by tests/test_import_diffusers.py).
BETA_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                   "DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "UniPCMultistepScheduler",
                   "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                   "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
_CLIPPING = ("DDPMScheduler", "DDIMScheduler")  # the ones with clip_sample (default True)
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                           beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                           rescale_betas_zero_snr=False, clip_sample_range=1.0, thresholding=False,
                           steps_offset=0, variance_type="fixed_small")
_KARRAS_BETAS = dict(beta_start=0.00085, beta_end=0.012)  # Stable Diffusion's betas
_CLASS_DEFAULTS = {
    "DDPMScheduler": dict(timestep_spacing="leading"),
    "DDIMScheduler": dict(timestep_spacing="leading"),
    "PNDMScheduler": dict(timestep_spacing="leading"),
    "HeunDiscreteScheduler": _KARRAS_BETAS,
    "KDPM2DiscreteScheduler": _KARRAS_BETAS,
    "KDPM2AncestralDiscreteScheduler": _KARRAS_BETAS,
}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample"}
# sigma-spacing options of the Euler / Heun / DPM-Solver / ... schedulers -> jaxdiff grid kinds
# (the same noise levels: Karras et al. 2022 Eq. 5 rho = 7; log-uniform sigma = uniform log-SNR;
# diffusers' Beta(0.6, 0.6) sigma quantiles)
_SIGMA_GRIDS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "logsnr", "use_beta_sigmas": "beta_sigmas"}
# model_index.json parts this import reads; any other named part is refused (e.g. an LDM's
# vqvae/, whose latents would otherwise be saved as images)
_IMPORTED_PARTS = ("unet", "transformer", "vae", "scheduler")


def _find(model_dir: str, *candidates: str) -> str | None:
    for c in candidates:
        p = os.path.join(model_dir, c)
        if os.path.exists(p):
            return p
    return None


def _check_pipeline_parts(model_dir: str) -> None:
    """Refuse a pipeline with parts this import would drop: a ``model_index.json`` entry other than
    unet / transformer / vae / scheduler (e.g. the VQModel ``vqvae`` of latent-diffusion pipelines,
    text encoders), a ``vqvae/`` folder, or a ``vae`` that is not an ``AutoencoderKL``. Sampling
    such an import would save the network's latents as if they were images."""
    parts = {}
    index = os.path.join(model_dir, "model_index.json")
    if os.path.exists(index):
        with open(index) as f:
            for name, value in json.load(f).items():
                # components are [library, class]; other keys (_class_name, id2label, ...) are settings
                if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]:
                    parts[name] = str(value[1])
    if os.path.isdir(os.path.join(model_dir, "vqvae")):
        parts.setdefault("vqvae", "VQModel")
    dropped = {k: v for k, v in parts.items() if k not in _IMPORTED_PARTS}
    if dropped:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(dropped.items()))
        raise ValueError(f"the pipeline in {model_dir} has parts jaxdiff does not import: {listed}. jaxdiff imports "
                         "a UNet2DModel / DiTTransformer2DModel, an AutoencoderKL vae and a scheduler; without the "
                         "missing parts its samples would not be the pipeline's (a VQModel's latents saved as images)")
    if parts.get("vae", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"the pipeline's vae is a {parts['vae']}: jaxdiff decodes with an AutoencoderKL only")


def scheduler_settings(scheduler_config: dict) -> tuple[dict, str, dict]:
    """``(process, prediction, sample)`` of a diffusers beta-chain scheduler config: the
    ``config.diffusion.process`` dict, ``config.diffusion.prediction``, and the
    ``config.sample`` settings that make ``jaxdiff sample --sampler ddpm|ddim`` step as that
    scheduler does: ``grid`` (its ``timestep_spacing``; DDPM / DDIM / PNDM default ``leading``),
    ``clip_denoised`` (its ``clip_sample_range`` when ``clip_sample``, DDPM / DDIM only) and, for
    DDIMScheduler, ``set_alpha_to_one`` (False: the last step lands on alphas_cumprod[0]).

    For the other classes ``grid`` is jaxdiff's grid of the same kind -- the timestep spacing, or
    ``karras`` / ``logsnr`` / ``beta_sigmas`` for ``use_karras_sigmas`` / ``use_exponential_sigmas``
    / ``use_beta_sigmas`` -- which can differ in detail from that scheduler's own (e.g. the
    multistep solvers' "linspace" takes N of N + 1 points: 999, 899, ..., 100 at 10 steps, jaxdiff's
    999, 888, ..., 0); :func:`jaxdiff.samplers.sample` reproduces each scheduler's grid exactly.

    Raises ValueError for a scheduler that is not over a beta chain (VE, flow matching, ...),
    for ``thresholding=True`` (dynamic thresholding is not implemented) and ``steps_offset != 0``
    with "leading" spacing (the only one diffusers offsets).
    """
    from jaxdiff.processes import BETA_SCHEDULES

    cls = scheduler_config.get("_class_name", "DDPMScheduler")
    if cls not in BETA_SCHEDULERS:
        raise ValueError(f"scheduler {cls}: jaxdiff imports the beta-chain schedulers "
                         f"({', '.join(BETA_SCHEDULERS)})")
    c = {**_SCHEDULER_DEFAULTS, "clip_sample": cls in _CLIPPING, "timestep_spacing": "linspace",
         **_CLASS_DEFAULTS.get(cls, {}),
         **{k: v for k, v in scheduler_config.items() if not k.startswith("_")}}
    if c["thresholding"]:
        raise ValueError("scheduler thresholding=True (dynamic thresholding, Saharia et al. 2022) "
                         "is not implemented in jaxdiff")
    if c["timestep_spacing"] not in ("linspace", "leading", "trailing") or (
            int(c["steps_offset"]) != 0 and c["timestep_spacing"] == "leading"):
        # diffusers adds steps_offset to "leading" timesteps only
        raise ValueError(f"scheduler steps_offset={c['steps_offset']}, timestep_spacing="
                         f"{c['timestep_spacing']!r}: jaxdiff's grids have the spacings linspace, leading, "
                         "trailing, and offset 0 (which diffusers applies to leading only)")
    if c["trained_betas"] is None and c["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"scheduler beta_schedule={c['beta_schedule']!r}: jaxdiff's discrete_vp has "
                         f"{', '.join(BETA_SCHEDULES)}")
    if c["prediction_type"] not in _PREDICTIONS:
        raise ValueError(f"scheduler prediction_type={c['prediction_type']!r}: jaxdiff has {sorted(_PREDICTIONS)}")
    process = {"name": "discrete_vp", "beta_schedule": c["beta_schedule"], "beta_start": float(c["beta_start"]),
               "beta_end": float(c["beta_end"]), "num_train_timesteps": int(c["num_train_timesteps"]),
               "rescale_betas_zero_snr": bool(c["rescale_betas_zero_snr"])}
    if c["trained_betas"] is not None:
        process["trained_betas"] = tuple(float(b) for b in c["trained_betas"])
    grid = c["timestep_spacing"]
    sigma_grids = [k for k in _SIGMA_GRIDS if c.get(k)]
    if len(sigma_grids) > 1:
        raise ValueError(f"scheduler sets {', '.join(sigma_grids)}: diffusers allows one of them")
    if sigma_grids:  # Karras / exponential / beta noise levels: jaxdiff's grid kinds of the same spacing
        grid = _SIGMA_GRIDS[sigma_grids[0]]
    sample = {"grid": grid,
              "clip_denoised": float(c["clip_sample_range"]) if c["clip_sample"] and cls in _CLIPPING else 0.0}
    if cls == "DDIMScheduler":  # its last step lands on alphas_cumprod[0] instead of clean data when False
        sample["set_alpha_to_one"] = bool(c.get("set_alpha_to_one", True))
    return process, _PREDICTIONS[c["prediction_type"]], sample


def import_pipeline(model_dir: str, workdir: str, config=None) -> dict:
    """Write ``workdir`` (config + step-0 checkpoint) from the diffusers pipeline in ``model_dir``.

    ``config``: an experiment config whose ``data``, ``optim``, ``ema``, ``train``, ``sample``
    and ``mesh`` sections to keep (for fine-tuning on a dataset); its ``model`` and
    ``diffusion.process`` / ``prediction`` are replaced. Default: :func:`base_config` with
    ``data.name="tfds"`` and an empty ``tfds_name`` (sampling and evaluation need no data).

    Returns a summary dict. Refuses a workdir that already holds checkpoints.
    """
    import jax
    import ml_collections
    import numpy as np

    from jaxdiff import parallel
    from jaxdiff.checkpoint import CheckpointManager, config_to_json
    from jaxdiff.config_base import base_config, check_sample_vae, check_variance
    from jaxdiff.modeling import build_model
    from jaxdiff.nets.from_diffusers import load_dit, load_unet
    from jaxdiff.train.loop import abstract_train_state, make_init_fn
    from jaxdiff.train.state import make_optimizer

    dit_dir = os.path.dirname(_find(model_dir, "transformer/config.json") or "") or None
    unet_dir = os.path.dirname(_find(model_dir, "unet/config.json", "config.json") or "") or None
    vae_dir = os.path.dirname(_find(model_dir, "vae/config.json") or "") or None
    sched_path = _find(model_dir, "scheduler/scheduler_config.json", "scheduler_config.json")
    if dit_dir is None and unet_dir is None:
        raise FileNotFoundError(f"no transformer/config.json, unet/config.json or config.json in {model_dir}: "
                                "expected a diffusers pipeline folder (a local copy; nothing is downloaded)")
    if sched_path is None:
        raise FileNotFoundError(f"no scheduler/scheduler_config.json or scheduler_config.json in {model_dir}: "
                                "the forward process (betas, prediction type) comes from it")
    _check_pipeline_parts(model_dir)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: import into a new --workdir")

    if dit_dir is not None:  # DiT (facebook/DiT-XL-2-256's layout: transformer/ + vae/ + scheduler/)
        fields, params = load_dit(dit_dir)
        height = width = fields["input_size"]
        channels = fields["in_channels"]
    else:
        fields, params, (height, width, channels) = load_unet(unet_dir)  # unet_fields refuses non-square
    with open(sched_path) as f:
        scheduler = json.load(f)
    process, prediction, sample = scheduler_settings(scheduler)
    sched_cls = scheduler.get("_class_name", "DDPMScheduler")
    if sched_cls in ("DDIMScheduler", "PNDMScheduler") and sample["grid"] == "linspace":
        warnings.warn(f"{sched_cls} with timestep_spacing='linspace' steps from each timestep t to t - T // N, "
                      "not to the next timestep it evaluates (diffusers' own loop is no sampler on one grid); "
                      "jaxdiff's ddim / pndm step between the timesteps they evaluate, so their samples differ "
                      "from that pipeline's", RuntimeWarning, stacklevel=2)

    if config is None:
        config = base_config()
        config.data.name, config.data.tfds_name = "tfds", ""
    else:
        config = config.copy_and_resolve_references()
    out_channels = 2 * channels if fields.get("learn_sigma") else int(fields.get("out_channels") or channels)
    variance_type = str(scheduler.get("variance_type") or "fixed_small")
    if variance_type == "fixed_small_log":  # diffusers: the same variance, exponentiated from its log
        variance_type = "fixed_small"
    if out_channels not in (channels, 2 * channels):
        raise ValueError(f"the network outputs {out_channels} channels for {channels}-channel data: jaxdiff reads "
                         f"C (the prediction) or 2C (prediction and iDDPM variance)")
    if variance_type not in ("fixed_small", "fixed_large", "learned_range"):
        raise ValueError(f"scheduler variance_type={variance_type!r}: jaxdiff's ddpm has fixed_small, fixed_large, "
                         "learned_range")
    if variance_type == "learned_range" and out_channels != 2 * channels:
        raise ValueError(f"scheduler variance_type='learned_range' but the network outputs {out_channels} channels, "
                         f"not 2 x {channels} (prediction and variance)")
    with config.unlocked():
        config.model = ml_collections.ConfigDict(fields)
        # A 2C-output network learned iDDPM's variances (DiT, improved-diffusion): ddpm samples with
        # them unless the scheduler says fixed_small / fixed_large.
        config.diffusion.variance = "learned_range" if out_channels == 2 * channels else "fixed"
        config.sample.variance = variance_type if scheduler.get("variance_type") else ""
        config.data.image_size, config.data.channels, config.data.dim = height, channels, 0
        config.diffusion.process = ml_collections.ConfigDict(process)
        config.diffusion.prediction = prediction
        config.sample.grid, config.sample.clip_denoised = sample["grid"], sample["clip_denoised"]
        config.sample.set_alpha_to_one = bool(sample.get("set_alpha_to_one", True))
        if dit_dir is None:
            # diffusers' UNet2DModel has no null class: jaxdiff's extra label row (class num_classes,
            # the unconditional branch of guidance) is zeros and was never trained; say so, so that
            # guidance on the import warns (a DiT's null class was trained, with label dropout 0.1)
            config.diffusion.class_dropout = 0.0
        if vae_dir is not None:  # latent model: sample / eval decode with the pipeline's VAE
            config.sample.vae = os.path.abspath(vae_dir)

    check_sample_vae(config)
    check_variance(config)
    model = build_model(config)
    tx = make_optimizer(config)
    mesh = parallel.make_mesh(-1, 1)
    _, shardings = abstract_train_state(config, model, tx, mesh)
    state = jax.jit(make_init_fn(config, model, tx), out_shardings=shardings)(jax.random.PRNGKey(int(config.seed)))
    weights = jax.device_put(params, shardings.params)
    state = dataclasses.replace(state, params=weights, ema={name: weights for name in state.ema})

    os.makedirs(workdir, exist_ok=True)
    ckpt = CheckpointManager(workdir, save_every=1, async_save=False)
    try:
        ckpt.save(0, state, config, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_to_json(config), f, indent=2)
    return {
        "workdir": workdir,
        "checkpoint": os.path.join(ckpt_dir, "0"),
        "network": dit_dir or unet_dir,
        "vae": config.sample.get("vae", ""),
        "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "image_shape": [height, width, channels],
        "process": process if "trained_betas" not in process else {**process, "trained_betas": "..."},
        "prediction": prediction,
        "ema_copies": sorted(state.ema),
        "sample": sample,  # config.sample.grid / clip_denoised: ddpm and ddim step as the scheduler
        "variance": config.diffusion.variance,  # learned_range for a 2C-output network
        "sample_variance": config.sample.variance,  # ddpm's: the scheduler's variance_type, "" = the model's
    }
