"""Neural networks of jaxdiff (Flax linen): DDPM/ADM :class:`UNet`, :class:`DiT`, toy :class:`MLP`;
latent diffusion's KL autoencoder in :mod:`.vae`, diffusers weights through :mod:`.from_diffusers`.

All three share one call signature::

    out = model.apply({'params': params}, x, t, y=None, train=False, rngs={'dropout': key})

* ``x``: NHWC images (UNet, DiT) or ``(B, D)`` vectors (MLP);
* ``t``: ``(B,)`` float noise-conditioning scalar, already scaled by the caller;
* ``y``: optional int labels; with ``num_classes > 0`` the label table has ``num_classes + 1``
  rows and ``y=None`` (or label ``num_classes``) is the null class for classifier-free guidance;
* ``train``: enables dropout (rng collection ``'dropout'``);
* output: float32, the shape of ``x`` with ``out_channels`` channels.

This subpackage imports nothing else from jaxdiff.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
from flax import linen as nn

from .dit import DIT_VARIANTS, DiT, dit
from .layers import count_params, timestep_embedding
from .mlp import MLP
from .unet import UNet

__all__ = [
    "UNet",
    "DiT",
    "MLP",
    "dit",
    "DIT_VARIANTS",
    "build",
    "NETS",
    "count_params",
    "timestep_embedding",
]

NETS: dict[str, type[nn.Module]] = {"unet": UNet, "dit": DiT, "mlp": MLP}

_DTYPES = {
    "float32": jnp.float32,
    "fp32": jnp.float32,
    "f32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "bf16": jnp.bfloat16,
    "float16": jnp.float16,
    "fp16": jnp.float16,
    "f16": jnp.float16,
}


def _module_fields(cls: type[nn.Module]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("parent", "name")]


def _convert(key: str, value: Any) -> Any:
    if key in ("dtype", "param_dtype") and isinstance(value, str):
        try:
            return _DTYPES[value.lower()]
        except KeyError:
            raise ValueError(
                f"unknown {key} {value!r}; valid: {sorted(_DTYPES)}"
            ) from None
    if isinstance(value, list):
        return tuple(_convert("", v) for v in value)
    return value


def build(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a network from a config mapping (dict or ``ml_collections.ConfigDict``).

    ``cfg["name"]`` selects the class (``"unet"``, ``"dit"``, ``"mlp"``); all other keys are
    constructor fields. For DiT an optional ``variant`` (e.g. ``"XL/2"``) fills the preset
    first and the remaining keys override it. ``dtype`` / ``param_dtype`` strings
    (``"float32"``, ``"bfloat16"``) become jnp dtypes and lists become tuples.

    Raises:
      ValueError: missing/unknown ``name``, unknown DiT ``variant``, or an unknown field.
    """
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"net config needs a 'name' key; valid names: {sorted(NETS)}")
    name = str(cfg.pop("name")).lower()
    if name not in NETS:
        raise ValueError(f"unknown net name {name!r}; valid names: {sorted(NETS)}")
    cls = NETS[name]

    kwargs: dict[str, Any] = {}
    variant = cfg.pop("variant", None)
    if variant is not None:
        if cls is not DiT:
            raise ValueError(f"'variant' is only valid for name='dit', not {name!r}")
        key = str(variant).upper().replace("DIT-", "")
        if key not in DIT_VARIANTS:
            raise ValueError(f"unknown DiT variant {variant!r}; valid: {sorted(DIT_VARIANTS)}")
        kwargs.update(DIT_VARIANTS[key])

    valid = _module_fields(cls)
    unknown = sorted(k for k in cfg if k not in valid)
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for net {name!r} ({cls.__name__}); valid fields: {valid}"
        )
    kwargs.update({k: _convert(k, v) for k, v in cfg.items()})
    return cls(**kwargs)
