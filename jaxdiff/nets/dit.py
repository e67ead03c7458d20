"""Diffusion Transformer (DiT) with adaLN-Zero conditioning (Flax linen).

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (DiT); this is a port of
``facebookresearch/DiT/models.py`` to NHWC / Flax:

* patchify: a conv with kernel = stride = ``patch_size`` (xavier-uniform on the flattened
  kernel), tokens in row-major order, plus a fixed (non-learned) 2-D sin-cos position
  embedding;
* conditioning ``c = t_embedder(t) + y_embedder(y)``: a 256-frequency sinusoidal timestep
  embedding -> Dense -> SiLU -> Dense, and a label table with ``num_classes + 1`` rows (the
  last one is the null class for classifier-free guidance);
* ``depth`` adaLN-Zero blocks: LayerNorm without affine parameters (eps 1e-6), modulated by
  shift / scale / gate vectors regressed from ``c`` by a zero-initialised ``Dense(6 * hidden)``;
  multi-head self-attention with qkv bias; an MLP with tanh-approximate GELU;
* final layer: adaLN (``Dense(2 * hidden)``, zero init) + zero-initialised
  ``Dense(p * p * out_channels)``, then unpatchify. ``learn_sigma=True`` doubles the output
  channels (mean and variance interpolation as in Nichol & Dhariwal 2021).

Because of adaLN-Zero the network output is exactly zero at initialisation.

DiT-XL/2 (``dit("XL/2")``) on 32x32x4 latents with 1000 classes has 674,834,720 trainable
parameters; with the fixed 256 x 1152 position embedding (a constant here, not a parameter)
675,129,632, the count the paper's code reports.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .conv import Conv
from .dropout import Dropout
from .layers import (
    LabelEmbedder,
    Norm32,
    TimestepEmbedder,
    dot_product_attention,
    get_2d_sincos_pos_embed,
    normal_init,
    resolve_labels,
    xavier_uniform,
    zeros,
)

Dtype = Any


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023, Fig. 3)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, *, train: bool) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = self.hidden_size
        b, n, _ = x.shape
        dense = lambda f, name, init=xavier_uniform: nn.Dense(  # noqa: E731
            f, kernel_init=init, bias_init=zeros, name=name, **kw
        )
        norm = lambda name: Norm32(0, 1e-6, use_affine=False, name=name, **kw)  # noqa: E731
        drop = Dropout(self.dropout, deterministic=not train)

        mod = dense(6 * d, "adaLN_modulation", zeros)(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)

        # Multi-head self-attention (timm Attention, qkv_bias=True).
        h = _modulate(norm("norm1")(x), shift_msa, scale_msa).astype(self.dtype)
        qkv = dense(3 * d, "qkv")(h).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        h = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, n, d)
        h = drop(dense(d, "proj")(h))
        x = x + (gate_msa[:, None, :] * h).astype(self.dtype)

        # MLP (timm Mlp with GELU(approximate="tanh")).
        h = _modulate(norm("norm2")(x), shift_mlp, scale_mlp).astype(self.dtype)
        h = nn.gelu(dense(int(d * self.mlp_ratio), "fc1")(h), approximate=True)
        h = drop(h)
        h = drop(dense(d, "fc2")(h))
        x = x + (gate_mlp[:, None, :] * h).astype(self.dtype)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-initialised linear projection to patch pixels."""

    hidden_size: int
    patch_size: int
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mod = nn.Dense(
            2 * self.hidden_size, kernel_init=zeros, bias_init=zeros, name="adaLN_modulation", **kw
        )(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = _modulate(Norm32(0, 1e-6, use_affine=False, name="norm_final", **kw)(x), shift, scale)
        return nn.Dense(
            self.patch_size * self.patch_size * self.out_channels,
            kernel_init=zeros,
            bias_init=zeros,
            name="linear",
            **kw,
        )(x.astype(self.dtype))


def _patch_kernel_init(key, shape, dtype=jnp.float32):
    """Xavier-uniform on the kernel viewed as ``(p * p * C_in, hidden)`` (as DiT does)."""
    kh, kw_, cin, cout = shape
    w = xavier_uniform(key, (kh * kw_ * cin, cout), dtype)
    return w.reshape(shape)


class DiT(nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023) with adaLN-Zero blocks.

    Call: ``model.apply({'params': p}, x, t, y=None, train=False)``.

    Args (call):
      x: NHWC ``(B, input_size, input_size, in_channels)`` (e.g. VAE latents).
      t: ``(B,)`` float noise-conditioning scalar, already scaled by the caller.
      y: optional int labels ``(B,)``; with ``num_classes > 0``, ``None`` means the null class
        ``num_classes``; with ``num_classes == 0`` it must be ``None``.
      train: enables dropout (only if ``dropout > 0``; DiT itself uses none).

    Returns:
      float32 ``(B, H, W, 2 * in_channels if learn_sigma else in_channels)``.

    Use :func:`dit` for the paper's presets (``"S/2"``, ``"B/4"``, ``"XL/2"``, ...).

    ``conv_impl`` (``"auto"`` / ``"xla"`` / ``"matmul"``) selects the patch-embedding conv's
    kernel gradient (:mod:`jaxdiff.nets.conv`; ``"auto"`` is XLA's own under jaxdiff's CPU
    compile options); values and parameters do not depend on it.
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    dropout: float = 0.0
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p, d = self.patch_size, self.hidden_size
        if x.ndim != 4:
            raise ValueError(f"DiT expects NHWC input, got shape {x.shape}")
        b, height, width, c_in = x.shape
        if (height, width, c_in) != (self.input_size, self.input_size, self.in_channels):
            raise ValueError(
                f"DiT configured for ({self.input_size}, {self.input_size}, {self.in_channels}) "
                f"inputs (input_size, input_size, in_channels) but got {x.shape[1:]}"
            )
        if height % p:
            raise ValueError(f"input_size {height} not divisible by patch_size {p}")
        if d % self.num_heads:
            raise ValueError(f"hidden_size {d} not divisible by num_heads {self.num_heads}")
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        labels = resolve_labels(y, self.num_classes, b)
        gh, gw = height // p, width // p

        # Patchify + fixed 2-D sin-cos position embedding.
        h = Conv(
            d,
            (p, p),
            conv_impl=self.conv_impl,
            strides=(p, p),
            padding="VALID",
            kernel_init=_patch_kernel_init,
            bias_init=zeros,
            name="x_embedder",
            **kw,
        )(x)
        h = h.reshape(b, gh * gw, d)
        pos = jnp.asarray(get_2d_sincos_pos_embed(d, gh, gw))
        h = (h + pos[None].astype(h.dtype)).astype(self.dtype)

        # Conditioning.
        c = TimestepEmbedder(
            d,
            frequency_dim=256,
            kernel_init=normal_init(0.02),
            name="t_embedder",
            **kw,
        )(t)
        if labels is not None:
            y_embedder = LabelEmbedder(self.num_classes, d, init_std=0.02, name="y_embedder", **kw)
            c = c + y_embedder(labels)

        for i in range(self.depth):
            h = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dropout, name=f"blocks_{i}", **kw)(
                h, c, train=train
            )
        h = FinalLayer(d, p, self.out_channels, name="final_layer", **kw)(h, c)

        # Unpatchify: (B, gh*gw, p*p*C) -> (B, gh*p, gw*p, C).
        co = self.out_channels
        h = h.reshape(b, gh, gw, p, p, co).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, gh * p, gw * p, co).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Presets (Peebles & Xie 2023, Table 1)
# ----------------------------------------------------------------------------------------------

_DIT_SIZES = {
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}

DIT_VARIANTS: dict[str, dict[str, int]] = {
    f"{size}/{patch}": dict(cfg, patch_size=patch)
    for size, cfg in _DIT_SIZES.items()
    for patch in (2, 4, 8)
}
"""``"S/2"`` ... ``"XL/8"`` -> ``dict(hidden_size, depth, num_heads, patch_size)``."""


def dit(variant: str, **overrides: Any) -> DiT:
    """A :class:`DiT` preset (``"S/2"``, ``"B/4"``, ``"L/8"``, ``"XL/2"``, ...) with overrides.

    ``dit("XL/2")`` is the paper's DiT-XL/2 (32x32x4 latents, 1000 classes, learned sigma);
    e.g. ``dit("S/2", input_size=8, in_channels=1, num_classes=10)`` for 8x8 digits.
    """
    key = variant.upper().replace("DIT-", "")
    if key not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; valid: {sorted(DIT_VARIANTS)}")
    return DiT(**{**DIT_VARIANTS[key], **overrides})
