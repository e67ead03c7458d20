"""Small conditional MLP for low-dimensional (e.g. 2-D toy) data (Flax linen).

The noise-conditioning scalar is embedded as in Ho et al. 2020 "DDPM" / Dhariwal & Nichol 2021
"ADM" (sinusoid -> Dense -> SiLU -> Dense); an optional label embedding (with a null class for
classifier-free guidance) is added to it. Each hidden layer receives the conditioning through
its own projection:

    h = Dense(hidden)(x)
    repeat depth times:  h = Dense(hidden)(SiLU(h + Dense(hidden)(SiLU(c))));  dropout
    out = Dense(out_dim)(SiLU(h))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from .dropout import Dropout
from .layers import LabelEmbedder, TimestepEmbedder, resolve_labels, xavier_uniform, zeros

Dtype = Any


class MLP(nn.Module):
    """Conditional SiLU MLP: ``(B, D) x (B,) [x (B,)] -> (B, out_dim or D)`` float32.

    Call: ``model.apply({'params': p}, x, t, y=None, train=False, rngs={'dropout': key})``;
    ``t`` is the caller-scaled float noise-conditioning scalar, ``y`` optional int labels
    (``num_classes > 0``; ``None`` = null class ``num_classes``).
    """

    hidden: int = 256
    depth: int = 3
    num_classes: int = 0
    out_dim: int | None = None
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if x.ndim != 2:
            raise ValueError(f"MLP expects (B, D) inputs, got shape {x.shape}")
        b, dim = x.shape
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1), (b,))
        labels = resolve_labels(y, self.num_classes, b)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = lambda f, name: nn.Dense(  # noqa: E731
            f, kernel_init=xavier_uniform, bias_init=zeros, name=name, **kw
        )

        c = TimestepEmbedder(self.hidden, frequency_dim=self.hidden, name="temb", **kw)(t)
        if labels is not None:
            label_emb = LabelEmbedder(
                self.num_classes, self.hidden, init_std=1.0, name="label_emb", **kw
            )
            c = c + label_emb(labels)
        c = nn.silu(c)

        h = dense(self.hidden, "dense_in")(x)
        for i in range(self.depth):
            h = h + dense(self.hidden, f"cond_{i}")(c)
            h = dense(self.hidden, f"dense_{i}")(nn.silu(h))
            h = Dropout(self.dropout, deterministic=not train)(h)
        out = dense(self.out_dim or dim, "dense_out")(nn.silu(h))
        return out.astype(jnp.float32)
