"""DDPM / ADM U-Net (Flax linen).

The architecture follows the TF reference of Ho, Jain & Abbeel 2020, "Denoising Diffusion
Probabilistic Models" (DDPM; ``diffusion_tf/models/unet.py``), a PixelCNN++-style U-Net with
Wide-ResNet blocks, GroupNorm, a sinusoidal time embedding added in every residual block, and
self-attention at selected resolutions. With the default fields it is the DDPM CIFAR-10 model:
35,746,307 parameters on 32x32x3 input (paper: 35.7M).

Optional variations from Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image
Synthesis" (ADM):

* class conditioning by a label embedding added to the time embedding (``num_classes > 0``;
  here with an extra null-class row for classifier-free guidance),
* multi-head attention (``num_heads`` / ``head_dim``),
* ``resblock_updown=True``: residual blocks that resample (BigGAN style) replace the
  plain up/down-sampling layers between resolutions.

Layer names follow the TF reference (``temb/dense0``, ``down_0_block_0/conv1``,
``nin_shortcut``, ``mid_attn_1/proj_out``, ``conv_out``, ...), which makes porting weights
straightforward.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .conv import Conv, UpsampleConv
from .dense import Dense
from .dropout import Dropout
from .layers import (
    LabelEmbedder,
    Norm32,
    TimestepEmbedder,
    dot_product_attention,
    resolve_labels,
    xavier_uniform,
    zeros,
)

Dtype = Any


# Padding of the stride-2 downsampling conv: TF's SAME pads (0, 1) (the DDPM reference; diffusers'
# downsample_padding=0); "symmetric" pads (1, 1) (diffusers' default downsample_padding=1).
_DOWNSAMPLE_PADDING = {"same": "SAME", "symmetric": ((1, 1), (1, 1))}


def _conv(features, name, *, kernel=3, stride=1, zero_init=False, conv_impl="auto", dtype,
          param_dtype, padding="SAME"):
    return Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        kernel_init=zeros if zero_init else xavier_uniform,
        bias_init=zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_impl=conv_impl,
        name=name,
    )


def _dense(features, name, *, zero_init=False, conv_impl="auto", dtype, param_dtype):
    return Dense(
        features,
        conv_impl=conv_impl,
        kernel_init=zeros if zero_init else xavier_uniform,
        bias_init=zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _downsample_pool(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample_nearest(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResnetBlock(nn.Module):
    """DDPM residual block (``resnet_block`` of the TF reference).

    ``GroupNorm -> swish -> conv3x3 -> + Dense(swish(temb)) -> GroupNorm -> swish -> dropout ->
    conv3x3 (zero init)``, plus a 1x1 ``nin_shortcut`` when the channel count changes. With
    ``temb=None`` there is no time-embedding projection (the blocks of a VAE, :mod:`.vae`).
    With ``resample="down"/"up"`` it is ADM's up/down-sampling residual block: after the first
    norm/activation both branches are average-pooled / nearest-upsampled by 2.
    """

    out_ch: int
    dropout: float = 0.0
    norm_groups: int = 32
    resample: str | None = None  # None | "down" | "up"
    conv_impl: str = "auto"
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        nkw = dict(kw, epsilon=self.norm_eps)
        c_in = x.shape[-1]
        h = nn.swish(Norm32(self.norm_groups, **nkw, name="norm1")(x))
        if self.resample == "down":
            h, x = _downsample_pool(h), _downsample_pool(x)
        elif self.resample == "up":
            h, x = _upsample_nearest(h), _upsample_nearest(x)
        elif self.resample is not None:
            raise ValueError(f"resample must be None, 'down' or 'up', got {self.resample!r}")
        h = _conv(self.out_ch, "conv1", conv_impl=self.conv_impl, **kw)(h)
        if temb is not None:
            h = h + _dense(self.out_ch, "temb_proj", **kw)(nn.swish(temb))[:, None, None, :]
        h = nn.swish(Norm32(self.norm_groups, **nkw, name="norm2")(h))
        h = Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.out_ch, "conv2", zero_init=True, conv_impl=self.conv_impl, **kw)(h)
        if c_in != self.out_ch:
            x = _dense(self.out_ch, "nin_shortcut", conv_impl=self.conv_impl, **kw)(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Self-attention over all pixels (``attn_block`` of DDPM; multi-head as in ADM).

    GroupNorm, 1x1 q/k/v projections, softmax(q k^T / sqrt(head_dim)) in float32, and a
    zero-initialised 1x1 output projection added to the input.
    """

    num_heads: int = 1
    head_dim: int | None = None
    norm_groups: int = 32
    conv_impl: str = "auto"
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dkw = dict(kw, conv_impl=self.conv_impl)
        b, hh, ww, c = x.shape
        if self.head_dim is not None:
            if c % self.head_dim:
                raise ValueError(f"channels {c} not divisible by head_dim {self.head_dim}")
            heads = c // self.head_dim
        else:
            heads = self.num_heads
        if c % heads:
            raise ValueError(f"channels {c} not divisible by num_heads {heads}")
        h = Norm32(self.norm_groups, epsilon=self.norm_eps, **kw, name="norm")(x)
        h = h.reshape(b, hh * ww, c)
        split = lambda a: a.reshape(b, hh * ww, heads, c // heads)  # noqa: E731
        q = split(_dense(c, "q", **dkw)(h))
        k = split(_dense(c, "k", **dkw)(h))
        v = split(_dense(c, "v", **dkw)(h))
        h = dot_product_attention(q, k, v).reshape(b, hh * ww, c)
        h = _dense(c, "proj_out", zero_init=True, **dkw)(h)
        return x.astype(self.dtype) + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
    """DDPM U-Net (Ho et al. 2020) with optional ADM variations (Dhariwal & Nichol 2021).

    Call: ``model.apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': key})``.

    Args (call):
      x: images ``(B, H, W, C)``; ``H`` and ``W`` divisible by ``2 ** (len(ch_mult) - 1)``.
      t: ``(B,)`` float noise-conditioning scalar, already scaled by the caller (DDPM step in
        ``[0, 1000)``, ``1000 * t``, EDM ``ln(sigma) / 4``, ...).
      y: optional int labels ``(B,)``; with ``num_classes > 0`` ``None`` means the null class
        ``num_classes``; with ``num_classes == 0`` it must be ``None``.
      train: enables dropout (rng collection ``'dropout'``).

    Returns:
      float32 ``(B, H, W, out_channels or C)``.

    Fields:
      ch: base width; the time embedding has width ``4 * ch``.
      ch_mult: width multiplier per resolution level.
      num_res_blocks: residual blocks per level on the down path (``+1`` on the up path).
      attn_resolutions: spatial sizes (pixels) at which self-attention follows each block.
      dropout: dropout rate inside residual blocks.
      num_classes: ``> 0`` adds a label embedding (``num_classes + 1`` rows, last = null).
      num_heads / head_dim: attention heads (``head_dim`` wins when set).
      out_channels: output channels (default: input channels).
      resblock_updown: ADM resampling residual blocks instead of strided conv / upsample conv.
      norm_groups: maximum GroupNorm groups: a C-channel norm uses the largest divisor of C
        that is <= norm_groups and leaves >= 4 channels per group (32 for DDPM widths; see
        ``layers.group_norm_groups``).
      norm_eps: GroupNorm epsilon (1e-6 as in DDPM; diffusers' ``UNet2DModel`` default is 1e-5).
      downsample_padding: ``"same"`` (TF's SAME, pads (0, 1): DDPM) or ``"symmetric"`` (pads
        (1, 1): diffusers' ``downsample_padding=1``) for the stride-2 downsampling conv.
      flip_sin_to_cos / freq_shift: the sinusoidal time embedding, as diffusers' ``Timesteps``
        (DDPM: ``[sin, cos]``, frequencies ``exp(-ln(1e4) i / (ch / 2 - freq_shift))``).
      conv_impl: ``"auto"`` (default: on the CPU backend the sub-pixel upsampling conv of
        :mod:`jaxdiff.nets.conv`, the blocked kernel gradient of the 1x1 / q, k, v Dense layers
        (:mod:`jaxdiff.nets.dense`), and the blocked conv kernel gradient unless traced by
        :func:`jaxdiff.compile_options.jit`; XLA's native convolutions, products and their
        gradients on GPU / TPU), ``"xla"`` (XLA's everywhere) or ``"matmul"`` (the blocked
        and sub-pixel paths anywhere). Forward-mode autodiff (``jax.jvp``) on CPU needs
        ``"auto"`` under :func:`jaxdiff.compile_options.jit`, or ``"xla"`` (see
        :mod:`jaxdiff.nets.conv`).
        Parameters are identical; values and gradients agree to float rounding (< 1e-5).
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    num_classes: int = 0
    num_heads: int = 1
    head_dim: int | None = None
    out_channels: int | None = None
    resblock_updown: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-6
    downsample_padding: str = "same"
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"UNet expects NHWC images, got shape {x.shape}")
        b, height, width, c_in = x.shape
        n_levels = len(self.ch_mult)
        factor = 2 ** (n_levels - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"spatial size {height}x{width} must be divisible by 2**(len(ch_mult)-1) = {factor}"
            )
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        labels = resolve_labels(y, self.num_classes, b)
        out_ch = self.out_channels or c_in
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_res = tuple(self.attn_resolutions)
        if self.downsample_padding not in _DOWNSAMPLE_PADDING:
            raise ValueError(f"downsample_padding must be one of {sorted(_DOWNSAMPLE_PADDING)}, "
                             f"got {self.downsample_padding!r}")

        def res_block(h, out, name, resample=None):
            return ResnetBlock(
                out, self.dropout, self.norm_groups, resample, self.conv_impl, self.norm_eps, **kw,
                name=name,
            )(h, temb, train=train)

        def attn(h, name):
            return AttnBlock(self.num_heads, self.head_dim, self.norm_groups, self.conv_impl,
                             self.norm_eps, **kw, name=name)(h)

        # Timestep embedding: sinusoid(ch) -> Dense(4ch) -> swish -> Dense(4ch) (DDPM convention:
        # [sin, cos], frequencies exp(-ln(1e4) i / (half - 1))).
        temb = TimestepEmbedder(
            4 * self.ch,
            frequency_dim=self.ch,
            flip_sin_to_cos=self.flip_sin_to_cos,
            freq_shift=self.freq_shift,
            **kw,
            name="temb",
        )(t)
        if labels is not None:  # ADM: label embedding added to the time embedding
            temb = temb + LabelEmbedder(
                self.num_classes, 4 * self.ch, init_std=1.0, **kw, name="label_emb"
            )(labels)

        # Downsampling
        ckw = dict(kw, conv_impl=self.conv_impl)
        hs = [_conv(self.ch, "conv_in", **ckw)(x)]
        for i_level in range(n_levels):
            level_ch = self.ch * self.ch_mult[i_level]
            for i_block in range(self.num_res_blocks):
                h = res_block(hs[-1], level_ch, f"down_{i_level}_block_{i_block}")
                if h.shape[1] in attn_res:
                    h = attn(h, f"down_{i_level}_attn_{i_block}")
                hs.append(h)
            if i_level != n_levels - 1:
                h = hs[-1]
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], f"down_{i_level}_downsample", resample="down")
                else:
                    h = _conv(h.shape[-1], f"down_{i_level}_downsample", stride=2,
                              padding=_DOWNSAMPLE_PADDING[self.downsample_padding], **ckw)(h)
                hs.append(h)

        # Middle
        h = hs[-1]
        h = res_block(h, h.shape[-1], "mid_block_1")
        h = attn(h, "mid_attn_1")
        h = res_block(h, h.shape[-1], "mid_block_2")

        # Upsampling
        for i_level in reversed(range(n_levels)):
            level_ch = self.ch * self.ch_mult[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop().astype(h.dtype)], axis=-1)
                h = res_block(h, level_ch, f"up_{i_level}_block_{i_block}")
                if h.shape[1] in attn_res:
                    h = attn(h, f"up_{i_level}_attn_{i_block}")
            if i_level != 0:
                if self.resblock_updown:
                    h = res_block(h, h.shape[-1], f"up_{i_level}_upsample", resample="up")
                else:  # nearest 2x + conv3x3 (sub-pixel form on CPU: jaxdiff.nets.conv)
                    h = UpsampleConv(
                        h.shape[-1], conv_impl=self.conv_impl, kernel_init=xavier_uniform,
                        bias_init=zeros, **kw, name=f"up_{i_level}_upsample",
                    )(h)
        assert not hs

        # End
        h = nn.swish(Norm32(self.norm_groups, epsilon=self.norm_eps, **kw, name="norm_out")(h))
        h = _conv(out_ch, "conv_out", zero_init=True, **ckw)(h)
        return h.astype(jnp.float32)
