"""DDPM on CIFAR-10 (Ho et al. 2020, Sec. 4 and App. B): 35.7M-parameter UNet, linear betas
1e-4..0.02 over T = 1000, eps-prediction, Adam lr 2e-4 with 5000 warmup steps, batch 128,
dropout 0.1, random flips, EMA 0.9999, 800k steps. Sampling as Ho et al.'s CIFAR-10 code
(``scripts/run_cifar.py``): 1000 ancestral steps with the reverse variance beta (``fixedlarge``)
and x0_hat clipped to [-1, 1] (``p_sample``'s ``clip_denoised=True``). Data through TFDS ``cifar10``
(prepare it once with ``tfds build cifar10 --file_format=array_record``)."""

from jaxdiff.config_base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "tfds"
    c.data.tfds_name = "cifar10"
    c.data.image_size, c.data.channels = 32, 3
    c.data.batch_size = 128
    c.data.flip = True
    c.model.name = "unet"
    c.model.ch = 128
    c.model.ch_mult = (1, 2, 2, 2)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.1
    c.diffusion.process = {"name": "discrete_vp", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    c.diffusion.prediction = "epsilon"
    c.optim.lr = 2e-4
    c.optim.warmup_steps = 5000
    c.optim.grad_clip = 1.0
    c.ema.decays = (0.9999,)
    c.train.num_steps = 800_000
    c.train.log_every = 100
    c.train.ckpt_every = 10_000
    c.sample.sampler = "ddpm"
    c.sample.steps = 1000
    c.sample.variance = "fixed_large"  # Ho et al.'s CIFAR-10 model_var_type='fixedlarge' (sigma^2 = beta)
    c.sample.clip_denoised = 1.0
    c.sample.num = 64
    c.sample.nrow = 8
    if variant == "tiny":
        c.data.name = "digits"  # shapes-only stand-in that needs no download
        c.data.image_size, c.data.channels = 8, 1
        c.data.batch_size = 8
        c.model.ch = 16
        c.model.ch_mult = (1, 2)
        c.model.num_res_blocks = 1
        c.model.attn_resolutions = (4,)
        c.optim.warmup_steps = 2
        c.train.num_steps = 2
        c.train.log_every = 1
        c.train.ckpt_every = 2
        c.sample.steps = 3
        c.sample.num = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid: tiny")
    return c
