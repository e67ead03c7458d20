"""The KL autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3 and App. G), as diffusers' ``AutoencoderKL``.

The SD VAE (``stabilityai/sd-vae-ft-ema`` / ``-mse``) that DiT (Peebles & Xie 2023) trains in
maps 256x256x3 images to 32x32x4 latents; DiT's data are ``0.18215 *`` a draw from the encoder's
posterior (:func:`posterior_sample`) and its samples are decoded from ``latents / 0.18215``. Both halves are built from the U-Net's
blocks (:mod:`.unet`: residual blocks without time embedding, single-head self-attention in the
middle, nearest-neighbour 2x upsampling + conv3x3, stride-2 conv3x3 downsampling padded (0, 1)).

* :class:`VAEEncoder` ``(x) -> (mean, logvar)`` of the diagonal Gaussian posterior (logvar
  clipped to [-30, 20] as diffusers' ``DiagonalGaussianDistribution``);
* :class:`VAEDecoder` ``(z) -> x`` (unscaled latents, i.e. already divided by the scaling factor);
* :class:`AutoencoderKL` holds both as ``encoder`` / ``decoder``; call ``encode`` / ``decode``
  through ``apply(..., method=...)``.

Weights: :func:`jaxdiff.nets.from_diffusers.load_vae` (a diffusers ``AutoencoderKL`` folder).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .conv import Conv, UpsampleConv
from .layers import Norm32, xavier_uniform, zeros
from .unet import AttnBlock, ResnetBlock

Dtype = Any


def _conv(features, name, kernel=3, stride=1, padding="SAME", **kw):
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                kernel_init=xavier_uniform, bias_init=zeros, name=name, **kw)


def posterior_sample(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """A draw ``mean + exp(logvar / 2) * noise`` from the encoder's diagonal Gaussian posterior
    (diffusers' ``latent_dist.sample()``)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


class _Mid(nn.Module):
    """Residual block, self-attention (one head), residual block: ``UNetMidBlock2D``."""

    channels: int
    attention: bool
    norm_groups: int
    norm_eps: float
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, h):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = lambda name: ResnetBlock(self.channels, 0.0, self.norm_groups, norm_eps=self.norm_eps,  # noqa: E731
                                         **kw, name=name)
        h = block("mid_block_1")(h, None, train=False)
        if self.attention:
            h = AttnBlock(1, None, self.norm_groups, norm_eps=self.norm_eps, **kw, name="mid_attn_1")(h)
        return block("mid_block_2")(h, None, train=False)


class VAEEncoder(nn.Module):
    """``x (B, H, W, C) -> (mean, logvar)``, each ``(B, H / 2**(L-1), W / 2**(L-1), latent_channels)``."""

    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    quant_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = list(self.block_out_channels)
        h = _conv(chans[0], "conv_in", **kw)(x)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, 0.0, self.norm_groups, norm_eps=self.norm_eps, **kw,
                                name=f"down_{i}_block_{j}")(h, None, train=False)
            if i != len(chans) - 1:  # diffusers' Downsample2D(padding=0): pad (0, 1), stride 2
                h = _conv(ch, f"down_{i}_downsample", stride=2, padding=((0, 1), (0, 1)), **kw)(h)
        h = _Mid(chans[-1], self.mid_attention, self.norm_groups, self.norm_eps, **kw, name="mid")(h)
        h = nn.swish(Norm32(self.norm_groups, epsilon=self.norm_eps, **kw, name="norm_out")(h))
        h = _conv(2 * self.latent_channels, "conv_out", **kw)(h)
        if self.quant_conv:
            h = _conv(2 * self.latent_channels, "quant_conv", kernel=1, **kw)(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)


class VAEDecoder(nn.Module):
    """``z (B, h, w, latent_channels) -> x (B, h 2**(L-1), w 2**(L-1), out_channels)``, float32."""

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    post_quant_conv: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = list(reversed(self.block_out_channels))
        if self.post_quant_conv:
            z = _conv(z.shape[-1], "post_quant_conv", kernel=1, **kw)(z)
        h = _conv(chans[0], "conv_in", **kw)(z)
        h = _Mid(chans[0], self.mid_attention, self.norm_groups, self.norm_eps, **kw, name="mid")(h)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, 0.0, self.norm_groups, norm_eps=self.norm_eps, **kw,
                                name=f"up_{i}_block_{j}")(h, None, train=False)
            if i != len(chans) - 1:
                h = UpsampleConv(ch, kernel_init=xavier_uniform, bias_init=zeros, **kw,
                                 name=f"up_{i}_upsample")(h)
        h = nn.swish(Norm32(self.norm_groups, epsilon=self.norm_eps, **kw, name="norm_out")(h))
        return _conv(self.out_channels, "conv_out", **kw)(h).astype(jnp.float32)


class AutoencoderKL(nn.Module):
    """Encoder and decoder (params ``{"encoder": ..., "decoder": ...}``).

    ``model.apply(v, x, method=AutoencoderKL.encode) -> (mean, logvar)``;
    ``model.apply(v, z, method=AutoencoderKL.decode) -> x``; ``__call__(x)`` decodes the mean."""

    in_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    quant_convs: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_groups=self.norm_groups, norm_eps=self.norm_eps, mid_attention=self.mid_attention,
                      dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = VAEEncoder(self.latent_channels, quant_conv=self.quant_convs, **common)
        self.decoder = VAEDecoder(self.in_channels, post_quant_conv=self.quant_convs, **common)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])
