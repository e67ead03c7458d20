"""2-D convolution for the jaxdiff nets, with a fast kernel gradient on XLA:CPU.

XLA:CPU computes the gradient of a convolution with respect to its *kernel* as another
convolution whose "kernel" is the whole output gradient (spatial size H x W). That lowering is
several times slower than the forward pass on CPU (measured here, 2 cores, jax 0.10.2:
3x3 conv 128->128 on 32x32x32 NHWC float32 -- forward 0.04 s, kernel gradient 0.15 s).

The kernel gradient of a convolution without dilation is a sum over the ``kh * kw`` taps::

    dK[i, j] = sum_{b, p, q} x_pad[b, s*p + i, s*q + j, :]^T  g[b, p, q, :]      (C_in x C_out)

i.e. ``kh * kw`` ordinary matrix products of a shifted (strided) view of the padded input with
the output gradient (the "im2col" view of Chellapilla et al. 2006, "High Performance
Convolutional Neural Networks for Document Processing", without materialising the im2col
matrix). On the same machine the nine 3x3 tap products take 0.11 s (one im2col matmul: 0.16 s;
XLA's native kernel gradient: 0.15 s). The forward pass and the input gradient stay XLA's own
convolutions, which are fast on CPU.

Where the tap products win was measured on an idle 2-core machine (2026-11-30,
``benchmarks/conv_backward.py``, batch 32): 64 -> 64 at 32x32, tap 37 ms vs native 65 ms;
128 -> 128 at 32x32, 58 vs 153 ms; 128 -> 128 at 16x16, 16 vs 27 ms; but 128 -> 128 at 8x8,
4.2 vs 3.0 ms, and about equal at 4x4. So ``impl="auto"`` on CPU takes the tap path when
``C_in >= 64``, ``C_out >= 64`` and the output has at least 16x16 pixels
(:data:`AUTO_MIN_CHANNELS`, :data:`AUTO_MIN_PIXELS`). On the benchmark UNet's train step this
rule gives 2.82-2.86 s per step against 3.34 s with XLA's kernel gradient everywhere (earlier
thresholds of 128 channels / 32x32, chosen from measurements on a heavily loaded machine: 3.12 s).

:func:`conv_general_dilated` is a drop-in replacement for ``lax.conv_general_dilated`` that
takes this path (a ``jax.custom_vjp``) when

* ``impl="matmul"``, or ``impl="auto"``, ``jax.default_backend() == "cpu"`` and the shape
  rule above holds, and
* the convolution is 2-D, NHWC / HWIO / NHWC, without input or kernel dilation and with one
  feature group (any stride and padding);

otherwise it is exactly ``lax.conv_general_dilated`` (XLA's native path on GPU / TPU).
:func:`Conv` builds a ``flax.linen.Conv`` that uses it, so parameter names and shapes
(``kernel`` ``(kh, kw, C_in, C_out)``, ``bias`` ``(C_out,)``) are those of ``nn.Conv``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

__all__ = ["CONV_IMPLS", "Conv", "conv_general_dilated", "resolve_conv_impl", "uses_matmul_grad"]

CONV_IMPLS = ("auto", "xla", "matmul")
"""Valid values of the nets' ``conv_impl`` field."""

_NHWC = ("NHWC", "HWIO", "NHWC")

AUTO_MIN_CHANNELS = 64
"""``impl="auto"`` on CPU: smallest C_in and C_out for which the tap-matmul gradient is used."""
AUTO_MIN_PIXELS = 16 * 16
"""``impl="auto"`` on CPU: smallest output H * W for which the tap-matmul gradient is used."""


def resolve_conv_impl(impl: str) -> str:
    """``"auto"`` -> ``"matmul"`` on the CPU backend, ``"xla"`` elsewhere; checks the name."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; valid: {CONV_IMPLS}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


def _all_ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def uses_matmul_grad(lhs_ndim, dimension_numbers, lhs_dilation=None, rhs_dilation=None,
                     feature_group_count=1, batch_group_count=1) -> bool:
    """Whether a convolution with these arguments is eligible for the tap-matmul kernel grad."""
    if lhs_ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if not (_all_ones(lhs_dilation) and _all_ones(rhs_dilation)):
        return False
    want = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    got = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), dimension_numbers or _NHWC)
    return got == want


def _conv_nhwc(x, k, strides, pads, precision):
    return lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=_NHWC, precision=precision
    )


def _kernel_grad_taps(x, g, kernel_shape, strides, pads, precision):
    """``dK`` as ``kh * kw`` matmuls of strided views of the padded input with ``g``."""
    kh, kw, c_in, c_out = kernel_shape
    sh, sw = strides
    _, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    g2 = g.reshape(-1, c_out)
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # accumulate bf16 in float32
    taps = []
    for i in range(kh):
        row = []
        for j in range(kw):
            view = lax.slice(
                xp,
                (0, i, j, 0),
                (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c_in),
                (1, sh, sw, 1),
            )
            row.append(
                lax.dot_general(
                    view.reshape(-1, c_in), g2, (((0,), (0,)), ((), ())),
                    precision=precision, preferred_element_type=acc,
                )
            )
        taps.append(jnp.stack(row))
    return jnp.stack(taps).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grad(x, k, strides, pads, precision):
    return _conv_nhwc(x, k, strides, pads, precision)


def _fwd(x, k, strides, pads, precision):
    return _conv_nhwc(x, k, strides, pads, precision), (x, k)


def _bwd(strides, pads, precision, res, g):
    x, k = res
    (dx,) = jax.linear_transpose(
        lambda x_: _conv_nhwc(x_, k, strides, pads, precision), x
    )(g)
    dk = _kernel_grad_taps(x, g.astype(x.dtype), k.shape, strides, pads, precision)
    return dx, dk.astype(k.dtype)


_conv_matmul_grad.defvjp(_fwd, _bwd)


def _explicit_pads(x_shape, k_shape, strides, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], k_shape[:2], strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    impl: str = "auto",
):
    """``lax.conv_general_dilated`` with the tap-matmul kernel gradient where eligible.

    Same arguments and forward result as ``lax.conv_general_dilated``; ``impl`` is
    ``"auto"`` (matmul kernel gradient on the CPU backend only, for convolutions with >= 64
    input and output channels and >= 16x16 output pixels: see the module docstring), ``"xla"`` (always lax) or
    ``"matmul"`` (always the tap-matmul gradient where eligible; lax otherwise).
    """
    auto = impl == "auto"
    impl = resolve_conv_impl(impl)
    if auto and impl == "matmul":
        out_pixels = (lhs.shape[1] // max(int(window_strides[0]), 1)) * (
            lhs.shape[2] // max(int(window_strides[1]), 1)) if lhs.ndim == 4 else 0
        if (lhs.ndim != 4 or min(rhs.shape[-2], rhs.shape[-1]) < AUTO_MIN_CHANNELS
                or out_pixels < AUTO_MIN_PIXELS):
            impl = "xla"
    eligible = (
        impl == "matmul"
        and preferred_element_type is None
        and uses_matmul_grad(lhs.ndim, dimension_numbers, lhs_dilation, rhs_dilation,
                             feature_group_count, batch_group_count)
    )
    if not eligible:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    pads = _explicit_pads(lhs.shape, rhs.shape, strides, padding)
    if any(lo < 0 or hi < 0 for lo, hi in pads):  # cropping: leave it to lax
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, dimension_numbers=dimension_numbers,
            precision=precision,
        )
    return _conv_matmul_grad(lhs, rhs, strides, pads, precision)


def Conv(features: int, kernel_size: Sequence[int], *, conv_impl: str = "auto", **kwargs: Any) -> nn.Conv:
    """A ``flax.linen.Conv`` whose convolution is :func:`conv_general_dilated` (``impl=conv_impl``).

    Parameters (``kernel``, ``bias``) have ``nn.Conv``'s names, shapes and initialisers, so
    checkpoints are interchangeable with a plain ``nn.Conv``.
    """
    resolve_conv_impl(conv_impl)  # validate early, with a clear message
    fn = functools.partial(conv_general_dilated, impl=conv_impl)
    return nn.Conv(features, tuple(kernel_size), conv_general_dilated=fn, **kwargs)
