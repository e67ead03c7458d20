"""DiT-XL/2 on ImageNet 256x256 in the latent space of the SD VAE, 32x32x4 (Peebles & Xie 2023):
675M parameters, class-conditional (1000 classes + null, label dropout 0.1), linear betas
1e-4..0.02, T = 1000, AdamW lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999,
learned sigma: 2 x 4 output channels trained with iDDPM's L_hybrid = L_simple + L_vlb / 1000 * T
(``diffusion.variance="learned_range"``, Nichol & Dhariwal 2021 Eq. 16), and DDPM's 250 sampling
steps use the learned variances (iDDPM Eq. 15), as DiT's ``sample.py`` does, with classifier-free
guidance scale 1.5 (Table 4's DiT-XL/2-G, FID 2.27; ``--guidance_scale 1`` for the unguided 9.62).
As DiT's ``forward_with_cfg``, only the first 3 of the 4 latent channels are guided
(``sample.guidance_channels = 3``; diffusers' ``DiTPipeline`` guides all 4).

The data: ImageNet's training images encoded once by the SD VAE (a local copy of diffusers'
``stabilityai/sd-vae-ft-ema``; jaxdiff downloads nothing), cropped and flipped as DiT's
``train.py`` does, into a latent dataset (:mod:`jaxdiff.data.latents`; the step draws
``z ~ q(z | x)`` from the stored posterior every time, as DiT re-encodes every batch)::

    jaxdiff encode --vae sd-vae-ft-ema --image_folder imagenet/train --out latents/imagenet256
    jaxdiff train --config configs/imagenet256_dit.py --workdir runs/dit_xl2 \
        --config.data.latents_dir=latents/imagenet256 --config.sample.vae=sd-vae-ft-ema

(``--image_folder`` is the ImageFolder layout DiT reads, labels = sorted synset directories;
``--tfds imagenet2012`` reads a prepared TFDS copy instead.) Samples are latents; with
``sample.vae`` set, ``jaxdiff sample`` / ``eval`` decode them to 256x256 images, as DiT does."""

from jaxdiff.config_base import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.data.name = "latents"
    c.data.latents_dir = ""  # required: --config.data.latents_dir=<jaxdiff encode --out>
    c.data.image_size, c.data.channels = 32, 4
    c.data.batch_size = 256
    c.model.name = "dit"
    c.model.variant = "XL/2"
    c.model.input_size = 32
    c.model.in_channels = 4
    c.model.num_classes = 1000
    c.model.learn_sigma = True
    c.diffusion.process = {"name": "discrete_vp", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    c.diffusion.prediction = "epsilon"
    c.diffusion.class_dropout = 0.1
    c.diffusion.variance = "learned_range"  # the sigma half of the outputs, trained by the bound
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0
    c.ema.decays = (0.9999,)
    c.train.num_steps = 400_000
    c.train.ckpt_every = 10_000
    c.sample.sampler = "ddpm"
    c.sample.steps = 250
    c.sample.guidance_scale = 1.5
    c.sample.guidance_channels = 3
    c.sample.num = 16
    c.sample.nrow = 4
    c.sample.decode_batch = 32  # each device decodes <= 32 latents at a time (~6 GiB of SD-VAE buffers, XLA:CPU's
                                # count; benchmarks/decode_memory.py), whatever the sampling batch
    if variant == "tiny":
        c.data.name = "digits"
        c.data.image_size, c.data.channels = 8, 1
        c.data.batch_size = 8
        c.model.variant = "S/2"
        c.model.input_size = 8
        c.model.in_channels = 1
        c.model.num_classes = 10
        c.diffusion.vlb_bins = 17  # the digits' gray levels 0..16
        c.model.hidden_size = 64
        c.model.depth = 2
        c.model.num_heads = 2
        c.train.num_steps = 2
        c.train.log_every = 1
        c.train.ckpt_every = 2
        c.sample.steps = 3
        c.sample.num = 8
    elif variant:
        raise ValueError(f"unknown variant {variant!r}; valid: tiny")
    return c
