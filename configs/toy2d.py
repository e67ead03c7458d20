"""An MLP denoiser on a 2-D mixture of 8 Gaussians (jaxdiff.data.toy2d "gmm8")."""

from jaxdiff.config_base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "toy2d"
    c.data.toy = "gmm8"
    c.data.dim = 2
    c.data.num_points = 65536
    c.data.batch_size = 512
    c.model.name = "mlp"
    c.model.hidden = 256
    c.model.depth = 3
    c.diffusion.process = {"name": "vp_cosine"}
    c.diffusion.prediction = "epsilon"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.ema.decays = (0.999,)
    c.train.num_steps = 4000
    c.train.log_every = 200
    c.train.ckpt_every = 2000
    c.sample.sampler = "dpmpp_2m"
    c.sample.steps = 20
    c.sample.num = 4096
    if variant == "tiny":
        c.data.num_points = 1024
        c.data.batch_size = 64
        c.model.hidden = 32
        c.model.depth = 2
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.ckpt_every = 3
        c.sample.num = 64
        c.sample.steps = 4
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid: tiny")
    return c
