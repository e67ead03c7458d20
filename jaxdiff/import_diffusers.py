"""``jaxdiff import``: a diffusers DDPM pipeline folder -> a jaxdiff workdir.

A pipeline folder (``model_index.json`` with ``unet/`` and ``scheduler/``, or the older flat
layout of ``google/ddpm-cifar10-32``: ``config.json``, ``diffusion_pytorch_model.safetensors``
and ``scheduler_config.json`` side by side) becomes a workdir that ``jaxdiff sample``,
``jaxdiff eval`` and ``jaxdiff train`` (fine-tuning from step 0) read like one that jaxdiff
trained:

* the network: :mod:`jaxdiff.nets.from_diffusers` (``UNet2DModel`` -> jaxdiff ``UNet``);
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

__all__ = ["import_pipeline", "scheduler_settings"]

# DDPMScheduler / DDIMScheduler defaults for the keys an old scheduler_config.json may omit.
_SCHEDULER_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                           beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                           rescale_betas_zero_snr=False, clip_sample=True, clip_sample_range=1.0)
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v_prediction", "sample": "sample"}


def _find(model_dir: str, *candidates: str) -> str | None:
    for c in candidates:
        p = os.path.join(model_dir, c)
        if os.path.exists(p):
            return p
    return None


def scheduler_settings(scheduler_config: dict) -> tuple[dict, str, dict]:
    """``(process, prediction, notes)`` of a diffusers DDPM/DDIM-family scheduler config: the
    ``config.diffusion.process`` dict, ``config.diffusion.prediction`` and the sampler settings
    jaxdiff does not keep in the config (``clip_sample``), to report."""
    from jaxdiff.processes import BETA_SCHEDULES

    c = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in scheduler_config.items() if not k.startswith("_")}}
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
    notes = {"clip_sample": bool(c["clip_sample"]), "clip_sample_range": float(c["clip_sample_range"])}
    return process, _PREDICTIONS[c["prediction_type"]], notes


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
    from jaxdiff.config_base import base_config
    from jaxdiff.modeling import build_model
    from jaxdiff.nets.from_diffusers import load_unet
    from jaxdiff.train.loop import abstract_train_state, make_init_fn
    from jaxdiff.train.state import make_optimizer

    unet_dir = os.path.dirname(_find(model_dir, "unet/config.json", "config.json") or "") or None
    sched_path = _find(model_dir, "scheduler/scheduler_config.json", "scheduler_config.json")
    if unet_dir is None:
        raise FileNotFoundError(f"no unet/config.json or config.json in {model_dir}: expected a diffusers "
                                "pipeline folder (a local copy; nothing is downloaded)")
    if sched_path is None:
        raise FileNotFoundError(f"no scheduler/scheduler_config.json or scheduler_config.json in {model_dir}: "
                                "the forward process (betas, prediction type) comes from it")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise FileExistsError(f"{ckpt_dir} already holds checkpoints: import into a new --workdir")

    fields, params, (height, width, channels) = load_unet(unet_dir)
    if height != width:
        raise ValueError(f"only square images: sample_size {height}x{width}")
    with open(sched_path) as f:
        process, prediction, notes = scheduler_settings(json.load(f))

    if config is None:
        config = base_config()
        config.data.name, config.data.tfds_name = "tfds", ""
    else:
        config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model = ml_collections.ConfigDict(fields)
        config.data.image_size, config.data.channels, config.data.dim = height, channels, 0
        config.diffusion.process = ml_collections.ConfigDict(process)
        config.diffusion.prediction = prediction

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
        "unet": unet_dir,
        "num_params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
        "image_shape": [height, width, channels],
        "process": process if "trained_betas" not in process else {**process, "trained_betas": "..."},
        "prediction": prediction,
        "ema_copies": sorted(state.ema),
        # diffusers' DDPM / DDIM pipelines clip x0_hat to +-clip_sample_range when clip_sample is
        # set; jaxdiff's ddpm / ddim samplers do the same by default (clip_sample=True, range 1).
        "scheduler_clip_sample": notes["clip_sample"],
        "scheduler_clip_sample_range": notes["clip_sample_range"],
    }
