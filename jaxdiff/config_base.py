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
    c.data.name = "digits"          # digits | toy2d | tfds
    c.data.batch_size = 128         # global batch, split over processes and devices
    c.data.image_size = 8
    c.data.channels = 1
    c.data.dim = 0                  # >0 for vector data (toy2d)
    c.data.flip = False             # random horizontal flips
    c.data.tfds_name = ""
    c.data.data_dir = ""
    c.data.image_key = "image"
    c.data.label_key = "label"
    c.data.toy = "gmm8"
    c.data.num_points = 65536

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"

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
    c.diffusion.class_dropout = 0.1     # label dropout to the null class (class-conditional models)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "constant"       # constant | cosine
    c.optim.decay_steps = 0
    c.optim.final_lr_fraction = 0.0
    c.optim.weight_decay = 0.0
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
    c.train.async_checkpoint = True
    c.train.tensorboard = True

    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "dpmpp_2m"
    c.sample.steps = 20
    c.sample.num = 100
    c.sample.nrow = 10
    c.sample.params = ""                # "" = first EMA copy; "params" = raw params; or an EMA name

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    return c
