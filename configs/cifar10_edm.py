"""EDM on CIFAR-10, unconditional DDPM++ setting (Karras et al. 2022, Table 7 / App. F.2):
EDM preconditioning (sigma_data 0.5), log-normal sigma (P_mean -1.2, P_std 1.2), EDM loss
weighting, Adam lr 1e-3 with 10M-image warmup ramp, batch 512, EMA half-life 0.5M images,
dropout 0.13, Heun with 18 steps (35 NFE) on the Karras rho=7 grid.

Not replicated: EDM's non-leaky augmentation (``--augment 0.12``: an AugmentPipe of flips,
scaling, rotation, anisotropy and translation, with the network conditioned on the 9 augmentation
labels); jaxdiff has no augmentation pipeline. Like EDM (``--xflip`` off by default) the dataset is
not flipped either, so this config trains without augmentation, which EDM's App. F.2 uses
against overfitting on CIFAR-10: expect a worse FID than their 1.97 at the same length.

Network: jaxdiff's DDPM-style UNet with DDPM++'s widths (128, mult 2-2-2, 4 blocks per level,
attention at 16x16); EDM's exact SongUNet layers (resample filters, skip scaling) are not
replicated, so the parameter count differs from EDM's 56M."""

from jaxdiff.config_base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "tfds"
    c.data.tfds_name = "cifar10"
    c.data.image_size, c.data.channels = 32, 3
    c.data.batch_size = 512
    c.data.flip = False  # EDM's --xflip default; its augmentation (flips among them) is not implemented
    c.model.name = "unet"
    c.model.ch = 128
    c.model.ch_mult = (2, 2, 2)
    c.model.num_res_blocks = 4
    c.model.attn_resolutions = (16,)
    c.model.dropout = 0.13
    c.model.resblock_updown = True
    c.diffusion.process = {"name": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}
    c.diffusion.prediction = "edm"
    c.diffusion.weighting = "edm"
    c.diffusion.t_density = "lognormal"
    c.diffusion.t_mean, c.diffusion.t_std = -1.2, 1.2
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10_000_000 // 512
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip = 0.0
    c.ema.decays = ()
    c.ema.half_life_images = 500_000
    c.ema.rampup_ratio = 0.05
    c.train.num_steps = 200_000_000 // 512
    c.train.ckpt_every = 5000
    c.sample.sampler = "heun"
    c.sample.steps = 18
    c.sample.num = 64
    c.sample.nrow = 8
    if variant == "tiny":
        c.data.name = "digits"
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
