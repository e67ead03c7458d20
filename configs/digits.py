"""The embedded default: a small class-conditional UNet (eps-prediction, DDPM linear betas)
on scikit-learn's bundled 8x8 digits. ``configs/digits.py:tiny`` is the variant tests use."""

from jaxdiff.config_base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "digits"
    c.data.image_size, c.data.channels = 8, 1
    c.data.batch_size = 64
    c.model.name = "unet"
    c.model.ch = 32
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (4,)
    c.model.dropout = 0.1
    c.model.num_classes = 10
    c.diffusion.process.name = "discrete_vp"
    c.diffusion.process.beta_schedule = "linear"
    c.diffusion.prediction = "epsilon"
    c.diffusion.vlb_bins = 17  # the bound's decoder, under diffusion.variance="learned_range": gray levels 0..16
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    c.optim.schedule = "cosine"
    c.optim.decay_steps = 0  # decay over train.num_steps (2000), so --config.train.num_steps moves it
    c.optim.final_lr_fraction = 0.05
    c.ema.decays = (0.995,)
    c.train.num_steps = 2000
    c.train.log_every = 100
    c.train.ckpt_every = 1000
    c.sample.sampler = "dpmpp_2m"
    c.sample.steps = 25
    c.sample.num = 100
    if variant == "tiny":
        _tiny(c)
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid: tiny")
    return c


def _tiny(c):
    c.data.batch_size = 16
    c.model.ch = 16
    c.model.ch_mult = (1, 2)
    c.model.num_res_blocks = 1
    c.model.dropout = 0.0
    c.optim.warmup_steps = 2
    c.optim.decay_steps = 20
    c.train.num_steps = 6
    c.train.log_every = 2
    c.train.ckpt_every = 3
    c.sample.steps = 4
    c.sample.num = 20
