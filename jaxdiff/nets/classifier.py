"""A noise-aware classifier ``p(y | x_t, t)`` for classifier guidance.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on Image Synthesis", Sec. 4 and App. F) use
the downsampling half of their UNet, conditioned on the timestep, followed by a pooled linear
head. :class:`NoisyClassifier` is that shape at small scale, built from the UNet's own residual
blocks: conv3x3 -> [ResnetBlock x num_res_blocks, ResnetBlock(down)] per level -> GroupNorm ->
swish -> global average pool -> Dense(num_classes). Vectors ``(B, D)`` get the MLP analogue (Dense
blocks with the time embedding added), for 2-D toy data.

Call signature as the other nets: ``model.apply({'params': p}, x, t, train=False) -> logits``
with ``t`` the network time ``(B,)`` (``process.net_time``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from .layers import Norm32, TimestepEmbedder
from .unet import ResnetBlock, _conv

__all__ = ["NoisyClassifier"]


class NoisyClassifier(nn.Module):
    """Logits of ``num_classes`` classes for noisy inputs ``x_t`` at network time ``t``."""

    num_classes: int
    ch: int = 32
    ch_mult: Sequence[int] = (1, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        if self.num_classes < 2:
            raise ValueError(f"NoisyClassifier needs num_classes >= 2, got {self.num_classes}")
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        temb = TimestepEmbedder(4 * self.ch, name="temb")(t)
        if x.ndim == 2:
            h = nn.Dense(self.ch * max(self.ch_mult), name="in")(x)
            for i in range(len(self.ch_mult) * max(self.num_res_blocks, 1)):
                h = h + nn.Dense(h.shape[-1], name=f"temb_{i}")(nn.swish(temb))
                h = nn.swish(nn.LayerNorm(name=f"norm_{i}")(h))
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
                h = nn.Dense(h.shape[-1], name=f"dense_{i}")(h)
            return nn.Dense(self.num_classes, name="head")(nn.swish(h))
        if x.ndim != 4:
            raise ValueError(f"NoisyClassifier takes (B, H, W, C) images or (B, D) vectors, got shape {x.shape}")
        kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
        h = _conv(self.ch, "conv_in", **kw)(x)
        for level, mult in enumerate(self.ch_mult):
            out = self.ch * mult
            for b in range(self.num_res_blocks):
                h = ResnetBlock(out, self.dropout, name=f"down_{level}_{b}")(h, temb, train=train)
            if level != len(self.ch_mult) - 1 and min(h.shape[1], h.shape[2]) >= 2:
                h = ResnetBlock(out, self.dropout, resample="down", name=f"down_{level}_pool")(
                    h, temb, train=train)
        h = nn.swish(Norm32(name="norm_out")(h))
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(h)
