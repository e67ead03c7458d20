"""Glue between an experiment config, a Flax network and the math core.

``config.model`` names the network (:func:`jaxdiff.nets.build`); ``config.diffusion`` names the
process, the prediction type and the loss. These helpers turn them into the pieces the trainer
and the samplers use: a raw ``net(x_in, t_in)`` closure and a ``denoise(x, t)`` function.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff import nets
from jaxdiff.parameterization import make_denoiser, make_denoiser_with_variance
from jaxdiff.processes import Process, make_process

__all__ = ["build_model", "build_process", "net_fn", "denoiser", "conditional_denoiser", "null_labels",
           "data_shape", "num_classes", "learns_variance"]


def build_model(config):
    """The Flax module named by ``config.model``.

    Under ``diffusion.variance="learned_range"`` a UNet (or MLP) whose config does not set
    ``out_channels`` (``out_dim``) gets twice the data's channels -- the prediction and iDDPM's
    variance interpolation v (Nichol & Dhariwal 2021, Sec. 3.1); a DiT's ``learn_sigma`` is on by default.
    """
    m = config.model
    if learns_variance(config):
        name = str(m.get("name", "")).lower()
        field = {"unet": "out_channels", "mlp": "out_dim"}.get(name)
        if field and m.get(field) is None:
            m = {**(m.to_dict() if hasattr(m, "to_dict") else dict(m)), field: 2 * data_shape(config)[-1]}
    return nets.build(m)


def build_process(config) -> Process:
    return make_process(config.diffusion.process)


def data_shape(config) -> tuple[int, ...]:
    """Shape of one example: (H, W, C) for images, (D,) for vectors."""
    d = config.data
    if d.get("dim"):
        return (int(d.dim),)
    return (int(d.image_size), int(d.image_size), int(d.channels))


def num_classes(config) -> int:
    return int(config.model.get("num_classes", 0) or 0)


def net_fn(model, params, y=None, *, train: bool = False, rngs=None, channels: int | None = None):
    """``net(x_in, t_in) -> output`` for fixed params and labels.

    ``channels``: keep only the first ``channels`` output channels (a DiT with learned sigma
    outputs 2C channels; the prediction is the first C, the variance the rest, used when
    ``diffusion.variance="learned_range"``).
    """

    def net(x, t):
        out = model.apply({"params": params}, x, t, y, train=train, rngs=rngs)
        if channels is not None and out.shape[-1] != channels:
            out = out[..., :channels]
        return out

    return net


def learns_variance(config) -> bool:
    """Whether the model was trained with iDDPM's learned variances (``diffusion.variance``)."""
    return str((config.get("diffusion") or {}).get("variance", "fixed")) == "learned_range"


def _wrap(config, net, with_variance: bool):
    d = config.diffusion
    make = make_denoiser_with_variance if with_variance else make_denoiser
    return make(net, build_process(config), d.prediction, float(d.get("sigma_data", 0.5)))


def denoiser(config, model, params, y=None, *, with_variance: bool = False):
    """``denoise(x, t) -> x0_hat`` for a trained model (eval mode).

    ``with_variance=True`` (models with ``diffusion.variance="learned_range"``): ``denoise(x, t)
    -> (x0_hat, v)``, ``v`` the variance channels ``samplers.ddpm(variance="learned_range")`` reads."""
    channels = None if with_variance else data_shape(config)[-1]
    return _wrap(config, net_fn(model, params, y, channels=channels), with_variance)


def conditional_denoiser(config, model, params, *, with_variance: bool = False):
    """``denoise(x, t, y) -> x0_hat`` (or ``(x0_hat, v)`` ``with_variance``) with the labels as an
    argument (eval mode), the form :func:`jaxdiff.guidance.classifier_free_guidance` batches both
    branches through."""
    channels = None if with_variance else data_shape(config)[-1]

    def denoise(x, t, y):
        return _wrap(config, net_fn(model, params, y, channels=channels), with_variance)(x, t)

    return denoise


def null_labels(config, batch: int):
    """The null class ``num_classes`` (the label dropout target) for a batch, for CFG's
    unconditional branch."""
    c = num_classes(config)
    if c == 0:
        raise ValueError("null_labels: this model is unconditional (model.num_classes=0); "
                         "classifier-free guidance needs a class-conditional model trained with "
                         "diffusion.class_dropout > 0")
    return jnp.full((batch,), c, jnp.int32)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
