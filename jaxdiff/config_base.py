"""The schema of an experiment config, with defaults. ``configs/*.py`` start from :func:`base_config`.

Sections: ``data``, ``model`` (kwargs of the network, :func:`jaxdiff.nets.build`),
``diffusion`` (process, prediction type, loss), ``optim``, ``ema``, ``train``, ``sample``,
``mesh``. Override any field on the command line: ``--config.optim.lr=1e-4``.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "digits"          # digits | toy2d | tfds | image_folder | latents
    c.data.batch_size = 128         # global batch, split over processes and devices
    c.data.image_size = 8
    c.data.channels = 1
    c.data.dim = 0                  # >0 for vector data (toy2d)
    c.data.flip = False             # random horizontal flips
    c.data.tfds_name = ""
    c.data.data_dir = ""
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.holdout_fraction = 0.1   # digits: stratified fraction held out as the "test" split
    c.data.split_seed = 0           # digits: seed of that train/test split
    c.data.toy = "gmm8"             # toy2d: which 2-D distribution
    c.data.num_points = 65536       # toy2d: size of the generated data set
    c.data.seed = 0                 # toy2d: seed of the generated points (not config.seed)
    c.data.image_folder = ""        # image_folder: root/<class>/<image> (or root/<split>/<class>/<image>)
    c.data.latents_dir = ""         # latents: the --out folder of `jaxdiff encode` (splits below it)
    c.data.latent_posterior = "sample"  # latents: train on posterior draws (DiT) | "mean"

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.dtype = "float32"       # compute dtype (parameters stay float32): --config.model.dtype=bfloat16

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.process = ml_collections.ConfigDict({"name": "discrete_vp", "beta_schedule": "linear"})
    c.diffusion.prediction = "epsilon"  # epsilon | sample | v_prediction | velocity | score | edm
    c.diffusion.weighting = "none"      # none | min_snr | p2 | edm
    c.diffusion.t_density = "default"   # default | uniform | logit_normal | lognormal
    c.diffusion.t_mean = ml_collections.config_dict.placeholder(float)
    c.diffusion.t_std = ml_collections.config_dict.placeholder(float)
    c.diffusion.min_snr_gamma = 5.0
    c.diffusion.p2_gamma = 1.0
    c.diffusion.p2_k = 1.0
    c.diffusion.sigma_data = 0.5
    c.diffusion.variance = "fixed"      # fixed | learned_range (iDDPM / DiT: 2C outputs, L_hybrid)
    c.diffusion.vlb_weight = 0.001      # iDDPM's lambda on L_vlb under learned_range
    c.diffusion.vlb_bins = 256          # levels of the data for the bound's decoder term (8-bit images)
    c.diffusion.class_dropout = 0.1     # label dropout to the null class (class-conditional models)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 100
    # The schedule runs on the optimizer's count of applied updates: a step skipped as non-finite
    # (train.nonfinite="skip") does not advance it, so it then lags the step number.
    c.optim.schedule = "constant"       # constant | cosine
    c.optim.decay_steps = 0             # cosine reaches lr * final_lr_fraction here; 0 = train.num_steps
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.0
    c.optim.weight_decay_mask = "all"   # all | matrices (ndim >= 2: kernels, embeddings; not biases, norms)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0

    c.ema = ml_collections.ConfigDict()
    c.ema.decays = (0.999,)
    c.ema.half_life_images = 0.0        # >0: EDM's EMA half-life in images (Karras et al. 2022)
    c.ema.rampup_ratio = 0.05

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.keep = 3
    c.train.async_checkpoint = False    # True: overlap writes with training; a kill -9 mid-write then loses > 1 interval
    c.train.tensorboard = True
    c.train.nonfinite = "skip"          # NaN/Inf loss or grads: "skip" the update (counted) | "error"
                                        # (a skipped update does not advance the lr schedule)

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "dpmpp_2m"
    c.sample.steps = 20
    c.sample.num = 100
    c.sample.nrow = 10
    c.sample.params = ""                # "" = first EMA copy; "params" = raw params; or an EMA name
    c.sample.grid = ""                  # time grid kind (schedules.GRID_KINDS); "" = the process's default
    c.sample.clip_denoised = 0.0        # ddpm / ddim: clip x0_hat to +-this (diffusers' clip_sample); 0 = off
    c.sample.set_alpha_to_one = True    # ddim: the last step lands on clean data; False: on t = 0
                                        # (alphas_cumprod[0]), as diffusers' DDIMScheduler(set_alpha_to_one=False)
    c.sample.variance = ""              # ddpm's reverse variance: fixed_small | fixed_large | learned_range;
                                        # "" = learned_range if diffusion.variance is, else fixed_small
    c.sample.vae = ""                   # latent models: a local diffusers AutoencoderKL folder whose decoder
                                        # turns samples into images (grids, eval); "" = samples are images
    c.sample.decode_batch = 0           # latent models: each device decodes at most this many latents at a time
                                        # (a lax.map over chunks; bounds the decoder's memory); 0 = all at once
    # classifier-free guidance (class-conditional models; jaxdiff.guidance): scale 1 = the
    # conditional model alone (one model call), 0 = unconditional; interval (lo, hi) guides only
    # where sigma/alpha is in (lo, hi] (() = every step); rescale = CFG-rescale phi (0 = off)
    c.sample.guidance_scale = 1.0
    c.sample.guidance_interval = ()
    c.sample.guidance_rescale = 0.0
    c.sample.guidance_channels = 0      # guide only the first N channels (DiT's code: 3 of 4); 0 = all

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.rules = ()                   # ((regex on the param path, PartitionSpec tuple), ...) overriding
                                        # the default fsdp layout; first match wins (docs/scaling.md)
    return c


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config(variant)`` of a config file given as ``path.py[:variant]`` (as --config takes it)."""
    import importlib.util
    import os

    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found; pass --config=configs/<name>.py[:variant]")
    mod_spec = importlib.util.spec_from_file_location("_jaxdiff_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()


def unknown_key_message(config, dotted: str) -> str | None:
    """Why ``config.<dotted>`` does not exist, listing the valid names where the path breaks;
    None if it exists."""
    import difflib

    node, done = config, []
    for part in dotted.split("."):
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = "config" + "".join("." + d for d in done)
            if not keys:
                return f"{where} is a value of type {type(node).__name__}; it has no field {part!r}"
            close = difflib.get_close_matches(part, keys, n=3)
            hint = f" Did you mean {' or '.join(where + '.' + c for c in close)}?" if close else ""
            return f"unknown config key {where}.{part}; valid keys of {where}: {', '.join(keys)}.{hint}"
        node, done = node[part], done + [part]
    return None


def check_config(config) -> None:
    """Eager checks of the names and sizes a user types, with messages that say what to do.

    Checks ``data.name``, ``sample.sampler``, ``train.nonfinite``, positive step counts, that a
    decaying learning-rate schedule ends after its warmup, and that the image size fits the
    network (UNet downsampling, DiT input size and patches).
    """
    from jaxdiff import samplers
    from jaxdiff.data import DATA_NAMES

    d, m, tc = config.data, config.model, config.train
    if d.name not in DATA_NAMES:
        raise ValueError(f"unknown dataset config.data.name={d.name!r}; valid names: {', '.join(DATA_NAMES)} "
                         "(for a TFDS dataset set data.name='tfds' and data.tfds_name)")
    if d.name == "latents":
        check_latent_data(config)
    if d.name == "image_folder" and not d.get("image_folder"):
        raise ValueError("config.data.name='image_folder' needs config.data.image_folder: a folder of "
                         "<class>/<image> files (or of <split>/<class>/<image>)")
    sc = config.get("sample")
    if sc is not None and sc.get("sampler") and sc.sampler not in samplers.available():
        raise ValueError(f"unknown sampler config.sample.sampler={sc.sampler!r}; valid names: "
                         f"{', '.join(samplers.available())}")
    if str(tc.get("nonfinite", "skip")) not in ("skip", "error"):
        raise ValueError(f"unknown config.train.nonfinite={tc.nonfinite!r}; valid: skip, error")
    for key in ("batch_size",):
        if int(d[key]) <= 0:
            raise ValueError(f"config.data.{key} must be positive, got {d[key]}")
    for key in ("log_every", "ckpt_every"):
        if int(tc.get(key, 1)) <= 0:
            raise ValueError(f"config.train.{key} must be positive, got {tc[key]}")
    if int(tc.num_steps) < 0:
        raise ValueError(f"config.train.num_steps must be >= 0, got {tc.num_steps}")
    if config.get("optim") is not None:
        from jaxdiff.train.state import resolve_decay_steps

        resolve_decay_steps(config)  # raises if a cosine decay would end within the warmup
    check_sample_vae(config)
    check_variance(config)
    if d.get("dim"):
        return
    size, channels, name = int(d.image_size), int(d.channels), str(m.name).lower()
    if name == "unet":
        factor = 2 ** (len(tuple(m.get("ch_mult", (1, 2, 2, 2)))) - 1)
        if size % factor:
            raise ValueError(
                f"config.data.image_size={size} is not divisible by 2**(len(config.model.ch_mult)-1)={factor}, "
                f"so the UNet cannot downsample it (ch_mult={tuple(m.ch_mult)}); use fewer ch_mult levels or "
                "another image size")
    elif name == "dit":
        want = (m.get("input_size"), m.get("in_channels"))
        if want[0] is not None and (int(want[0]), int(want[1] or channels)) != (size, channels):
            raise ValueError(
                f"the DiT is configured for {want[0]}x{want[0]}x{want[1]} inputs (config.model.input_size, "
                f"in_channels) but the data is {size}x{size}x{channels} (config.data.image_size, channels); "
                "make them equal")
        patch = m.get("patch_size") or (str(m.variant).rsplit("/", 1)[-1] if m.get("variant") else None)
        if patch and size % int(patch):
            raise ValueError(f"config.data.image_size={size} is not divisible by config.model.patch_size={patch}")


def check_latent_data(config) -> None:
    """``data.name = "latents"``: a ``latents_dir``, a known ``latent_posterior``, and no random
    flips (a mirrored latent is not the latent of the mirrored image: ``jaxdiff encode`` stores
    the mirror images' posteriors as examples of their own)."""
    from jaxdiff.data.latents import POSTERIORS

    d = config.data
    if not d.get("latents_dir"):
        raise ValueError("config.data.name='latents' needs config.data.latents_dir: the --out folder of "
                         "`jaxdiff encode --vae VAE_DIR --image_folder IMAGES --out LATENTS_DIR`")
    if str(d.get("latent_posterior", "sample")) not in POSTERIORS:
        raise ValueError(f"unknown config.data.latent_posterior={d.latent_posterior!r}; valid: {', '.join(POSTERIORS)}")
    if d.get("flip"):
        raise ValueError("config.data.flip=True flips latents, which is not flipping the images: a latent dataset "
                         "holds the mirror images' own latents (`jaxdiff encode --flip`, the default); set "
                         "config.data.flip=False")


def check_variance(config) -> None:
    """``diffusion.variance`` and ``sample.variance`` are known names, and a learned variance has
    the discrete chain and integer timesteps its bound needs (:mod:`jaxdiff.variance`)."""
    from jaxdiff.processes import make_process
    from jaxdiff.variance import SAMPLER_VARIANCES, VARIANCES, check_learned_variance

    d = config.get("diffusion") or {}
    variance = str(d.get("variance", "fixed"))
    if variance not in VARIANCES:
        raise ValueError(f"unknown config.diffusion.variance={variance!r}; valid: {', '.join(VARIANCES)}")
    sv = str((config.get("sample") or {}).get("variance", "") or "")
    if sv and sv not in SAMPLER_VARIANCES:
        raise ValueError(f"unknown config.sample.variance={sv!r}; valid: {', '.join(SAMPLER_VARIANCES)} "
                         "or '' (the model's)")
    if sv == "learned_range" and variance != "learned_range":
        raise ValueError("config.sample.variance='learned_range' needs a model trained with "
                         "config.diffusion.variance='learned_range'")
    if variance == "learned_range":
        try:
            check_learned_variance(make_process(d.process), str(d.get("t_density", "default")), str(d.prediction))
        except ValueError as e:
            raise ValueError(f"config: {e}") from None


def check_sample_vae(config) -> None:
    """``config.sample.vae``, if set, is a diffusers ``AutoencoderKL`` folder whose latents have
    the data's channels (reads its ``config.json`` only); ValueError / FileNotFoundError naming
    the key otherwise."""
    import json
    import os

    path = (config.get("sample") or {}).get("vae", "")
    if not path:
        return
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise FileNotFoundError(f"config.sample.vae={path!r}: no config.json there (expected a local diffusers "
                                "AutoencoderKL folder)")
    from jaxdiff.nets.from_diffusers import vae_fields

    with open(cfg) as f:
        try:
            fields, _ = vae_fields(json.load(f))
        except ValueError as e:
            raise ValueError(f"config.sample.vae={path!r}: {e}") from None
    if not config.data.get("dim") and fields["latent_channels"] != int(config.data.channels):
        raise ValueError(f"config.sample.vae={path!r} decodes {fields['latent_channels']}-channel latents but the "
                         f"model's samples have config.data.channels={int(config.data.channels)}")
