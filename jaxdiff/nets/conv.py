"""2-D convolution for the jaxdiff nets: a blocked-matmul kernel gradient and a sub-pixel
upsampling conv for XLA:CPU.

**Which path runs by default.** jaxdiff compiles its own functions with
:func:`jaxdiff.compile_options.jit`, which on CPU keeps convolutions on XLA's own (Eigen) kernels
instead of YNNPACK's. Under those options XLA's kernel gradient is the fastest one measured, so
``impl="auto"`` keeps XLA's convolutions and gradients when traced there
(:func:`jaxdiff.compile_options.tracing_with_eigen_convolutions`), and only the upsampling layer
takes the sub-pixel form below (batch 32, 16x16 -> 32x32, 128 channels: forward 17.8 vs 34.3 ms,
forward + backward 69.9 vs 101.6 ms; 2026-11-30 10:22 run of ``benchmarks/conv_backward.py``,
jax 0.10.2, 2-core machine). The blocked kernel gradient is what ``"auto"`` picks under any
other compilation on CPU (a plain ``jax.jit``: YNNPACK convolutions), and what
``impl="matmul"`` forces.

**The blocked kernel gradient.** With jaxlib's default CPU compilation (YNNPACK convolutions),
the gradient of a convolution with respect to its *kernel* is several times slower than the
forward pass (batch 32, 3x3 conv 64 -> 64 at 32x32: forward 18.4 ms, kernel gradient 76.1 ms).

The kernel gradient of a convolution without dilation is a sum over the ``kh * kw`` taps::

    dK[i, j] = sum_{b, p, q} x_pad[b, s*p + i, s*q + j, :]^T  g[b, p, q, :]      (C_in x C_out)

i.e. ordinary matrix products of shifted (strided) views of the padded input with the output
gradient (the "im2col" view of Chellapilla et al. 2006, "High Performance Convolutional Neural
Networks for Document Processing"). jaxdiff computes it as follows (``_kernel_grad_blocked``):
the ``kw`` column-shifted views are concatenated along channels, so that each kernel *row* is
one product ``g^T A_i`` of shape ``(C_out, kw * C_in)``; and the batch is processed in blocks
of about :data:`KERNEL_GRAD_CHUNK_PIXELS` output pixels, summed in a ``lax.scan``, so that a
block's operands stay in cache. Measured with ``benchmarks/conv_backward.py --compile
jaxlib-default`` (2-core machine, 2026-11-30 10:22, batch 32, ms), kernel gradient by XLA / by
this path: 64 -> 64 at 32x32, 76.1 / 24.0; 192 -> 64 at 32x32, 235.3 / 76.4; 128 -> 128 at
32x32, 168.8 / 68.5; 128 -> 128 at 16x16, 27.5 / 16.7; but 128 -> 128 at 8x8, 3.5 / 4.1. So
outside jaxdiff's compile options, ``impl="auto"`` on CPU takes this path when ``C_in >= 64``,
``C_out >= 64`` and the output has at least 16x16 pixels (:data:`AUTO_MIN_CHANNELS`,
:data:`AUTO_MIN_PIXELS`). Under them, XLA's own kernel gradient is faster still (64 -> 64 at
32x32: 18.5 ms vs 24.9 for this path, same run). The forward pass and the input gradient are always XLA's
own convolutions.

:func:`conv_general_dilated` is a drop-in replacement for ``lax.conv_general_dilated`` that
takes this path (a ``jax.custom_vjp``) when

* ``impl="matmul"``, or ``impl="auto"``, ``jax.default_backend() == "cpu"`` and the shape
  rule above holds, and
* the convolution is 2-D, NHWC / HWIO / NHWC, without input or kernel dilation and with one
  feature group (any stride and padding);

otherwise it is exactly ``lax.conv_general_dilated`` (XLA's native path on GPU / TPU).
:func:`Conv` builds a ``flax.linen.Conv`` that uses it, so parameter names and shapes
(``kernel`` ``(kh, kw, C_in, C_out)``, ``bias`` ``(C_out,)``) are those of ``nn.Conv``.

**Forward-mode autodiff** (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) works through every
path that runs under :func:`jaxdiff.compile_options.jit` with ``impl="auto"``, and through
``impl="xla"`` anywhere: the sub-pixel upsampling layer is then a ``jax.custom_jvp`` whose tangent
(four 2x2 convolutions) transposes into the same gradient as before, and the Dense layers'
blocked kernel gradient (:mod:`jaxdiff.nets.dense`) likewise. The blocked *convolution* kernel
gradient -- ``impl="matmul"``, or ``"auto"`` on CPU under a plain ``jax.jit`` -- is a
``jax.custom_vjp``, which JAX differentiates in reverse mode only (``TypeError: can't apply
forward-mode autodiff (jvp) to a custom_vjp function``): for forward mode there, compile with
:func:`jaxdiff.compile_options.jit` or build the network with ``conv_impl="xla"``.

:func:`upsample2x_conv3x3` / :class:`UpsampleConv` compute the UNet's upsampling layer
(nearest 2x, then a 3x3 conv) in its sub-pixel form on CPU: four 2x2 convolutions of the
low-resolution input, 16/36 of the products (batch 32, 16x16 -> 32x32, 128 channels: forward
18.8 vs 36.7 ms, forward + backward 67.1 vs 108.4 ms).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax
from jax.custom_derivatives import SymbolicZero

from jaxdiff.compile_options import tracing_with_eigen_convolutions

__all__ = [
    "CONV_IMPLS", "Conv", "UpsampleConv", "conv_general_dilated", "resolve_conv_impl",
    "upsample2x_conv3x3", "uses_matmul_grad",
]

CONV_IMPLS = ("auto", "xla", "matmul")
"""Valid values of the nets' ``conv_impl`` field."""

_NHWC = ("NHWC", "HWIO", "NHWC")

AUTO_MIN_CHANNELS = 64
"""``impl="auto"`` on CPU: smallest C_in and C_out for which the blocked-matmul kernel gradient is used."""
AUTO_MIN_PIXELS = 16 * 16
"""``impl="auto"`` on CPU: smallest output H * W for which the blocked-matmul kernel gradient is used."""


def resolve_conv_impl(impl: str) -> str:
    """``"auto"`` -> ``"matmul"`` (the CPU path: sub-pixel upsampling, and the kernel-gradient rule
    of :func:`conv_general_dilated`) on the CPU backend, ``"xla"`` elsewhere; checks the name."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"unknown conv_impl {impl!r}; valid: {CONV_IMPLS}")
    if impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    return impl


def _all_ones(v) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def uses_matmul_grad(lhs_ndim, dimension_numbers, lhs_dilation=None, rhs_dilation=None,
                     feature_group_count=1, batch_group_count=1) -> bool:
    """Whether a convolution with these arguments is eligible for the blocked-matmul kernel gradient."""
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


KERNEL_GRAD_CHUNK_PIXELS = 2048
"""Output pixels per block of the blocked kernel gradient (a divisor of the batch is used)."""


def block_rows(n: int, block_size: int) -> int:
    """The largest divisor of ``n`` that is ``<= block_size`` (the rows of one block)."""
    return max(d for d in range(1, min(max(block_size, 1), n) + 1) if n % d == 0)


def sum_over_blocks(block, operands, block_size: int, out_shape, out_dtype):
    """``sum_b block(*[a[b] for a in operands])`` over blocks of the leading axis, in a ``lax.scan``.

    The blocks hold the largest divisor of the leading size that is ``<= block_size`` rows; one
    block is a plain call. Shared by the blocked kernel gradients here and in
    :mod:`jaxdiff.nets.dense`.
    """
    n = operands[0].shape[0]
    chunk = block_rows(n, block_size)
    if chunk == n:
        return block(*operands)
    split = tuple(a.reshape(n // chunk, chunk, *a.shape[1:]) for a in operands)
    total, _ = lax.scan(lambda s, xs: (s + block(*xs), None), jnp.zeros(out_shape, out_dtype), split)
    return total


def _kernel_grad_blocked(x, g, kernel_shape, strides, pads, precision,
                      chunk_pixels: int = KERNEL_GRAD_CHUNK_PIXELS):
    """``dK`` from matmuls of shifted views of the padded input with ``g``, blocked over the batch.

    Per block of images: the ``kw`` column-shifted (strided) views of the padded input are
    concatenated along channels, ``A`` (b, H_pad, W_out, kw * C_in); then for each kernel row
    ``i`` one product ``g^T A[:, i + s * p]`` gives ``dK[i]`` as ``(C_out, kw * C_in)``. The
    blocks (about ``chunk_pixels`` output pixels, so that a block's operands stay in cache)
    are summed in a ``lax.scan``.
    """
    kh, kw, c_in, c_out = kernel_shape
    sh, sw = strides
    n, ho, wo, _ = g.shape
    xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # accumulate bf16 in float32
    want = max(1, chunk_pixels // max(ho * wo, 1))

    def block(xc, gc):
        b, hp = xc.shape[0], xc.shape[1]
        cols = [
            lax.slice(xc, (0, 0, j, 0), (b, hp, j + sw * (wo - 1) + 1, c_in), (1, 1, sw, 1))
            for j in range(kw)
        ]
        a = jnp.concatenate(cols, axis=-1) if kw > 1 else cols[0]
        g2 = gc.reshape(-1, c_out)
        rows = []
        for i in range(kh):
            view = lax.slice(a, (0, i, 0, 0), (b, i + sh * (ho - 1) + 1, wo, kw * c_in), (1, sh, 1, 1))
            rows.append(lax.dot_general(
                g2, view.reshape(-1, kw * c_in), (((0,), (0,)), ((), ())),
                precision=precision, preferred_element_type=acc,
            ))
        return jnp.stack(rows)                                    # (kh, c_out, kw * c_in)

    dk = sum_over_blocks(block, (xp, g), want, (kh, c_out, kw * c_in), acc)
    return dk.reshape(kh, c_out, kw, c_in).transpose(0, 2, 3, 1).astype(x.dtype)


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
    dk = _kernel_grad_blocked(x, g.astype(x.dtype), k.shape, strides, pads, precision)
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
    """``lax.conv_general_dilated`` with the blocked-matmul kernel gradient where eligible.

    Same arguments and forward result as ``lax.conv_general_dilated``; ``impl`` is
    ``"auto"`` (on the CPU backend, unless traced by :func:`jaxdiff.compile_options.jit`, the
    matmul kernel gradient for convolutions with >= 64 input and output channels and >= 16x16
    output pixels; lax otherwise: see the module docstring), ``"xla"`` (always lax) or
    ``"matmul"`` (always the blocked-matmul kernel gradient where eligible; lax otherwise).
    """
    auto = impl == "auto"
    impl = resolve_conv_impl(impl)
    if auto and impl == "matmul":
        out_pixels = (lhs.shape[1] // max(int(window_strides[0]), 1)) * (
            lhs.shape[2] // max(int(window_strides[1]), 1)) if lhs.ndim == 4 else 0
        if (tracing_with_eigen_convolutions()
                or lhs.ndim != 4 or min(rhs.shape[-2], rhs.shape[-1]) < AUTO_MIN_CHANNELS
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


# --- nearest-neighbour 2x upsampling followed by a 3x3 SAME convolution ----------------------
#
# Output pixel (2p + a, 2q + b) of conv3x3(upsample2x(x)) reads upsampled rows 2p + a - 1 ..
# 2p + a + 1, i.e. input rows {p - 1, p} (a = 0) or {p, p + 1} (a = 1), with the kernel rows
# collapsed onto them: a = 0 takes w[0] and w[1] + w[2], a = 1 takes w[0] + w[1] and w[2]; the
# same for columns. So each of the four output phases (a, b) is a 2x2 convolution of the
# *low-resolution* input with a kernel made of sums of taps of the 3x3 one: 4 * 4 = 16
# multiply-adds per input pixel and channel pair instead of 9 * 4 = 36 (the sub-pixel view of
# resize-convolutions: Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using
# an Efficient Sub-Pixel Convolutional Neural Network", CVPR; Odena et al. 2016,
# "Deconvolution and Checkerboard Artifacts", Distill). Exact up to float rounding.
_PHASE_ROWS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))
"""``_PHASE_ROWS[a][u][i]``: 3x3 kernel row ``i`` contributes to 2x2 row ``u`` of phase ``a``."""


def _collapse(w, axis):
    """``(..., 3, ...) -> (2[a], ..., 2[u], ...)``: the kernel taps of each phase along ``axis``."""
    t = [lax.index_in_dim(w, i, axis) for i in range(3)]
    phases = [
        [sum(t[i] for i in range(3) if _PHASE_ROWS[a][u][i]) for u in range(2)] for a in range(2)
    ]
    return jnp.stack([jnp.concatenate(p, axis=axis) for p in phases])


def _phase_kernels(kernel):
    """``(2, 2, 2, 2, C_in, C_out)`` [a, b, u, v]: the 2x2 kernel of output phase (a, b)."""
    rows = _collapse(kernel, 0)                      # (a, u, 3, C_in, C_out)
    return jnp.moveaxis(_collapse(rows, 2), 0, 1)    # (b, a, u, v, ...) -> (a, b, u, v, ...)


def _upsample_conv_phases(x, kernel, impl, precision):
    """Four 2x2 VALID convolutions of the padded input, interleaved (the gradient path)."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ks = _phase_kernels(kernel)
    rows = []
    for a in range(2):
        cols = [
            conv_general_dilated(xp[:, a:a + h + 1, b:b + w + 1], ks[a, b], (1, 1), "VALID",
                                 dimension_numbers=_NHWC, precision=precision, impl=impl)
            for b in range(2)
        ]
        rows.append(jnp.stack(cols, axis=3))               # (n, h, w, 2[b], c_out)
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, kernel.shape[-1])


def _upsample_conv_single(x, kernel, precision):
    """One 2x2 VALID convolution with 4 * C_out outputs, then each phase cropped (forward path)."""
    n, h, w, c_in = x.shape
    c_out = kernel.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ks = _phase_kernels(kernel)                              # (a, b, u, v, c_in, c_out)
    k_all = jnp.transpose(ks, (2, 3, 4, 0, 1, 5)).reshape(2, 2, c_in, 4 * c_out)
    z = lax.conv_general_dilated(xp, k_all, (1, 1), "VALID", dimension_numbers=_NHWC,
                                 precision=precision)
    z = z.reshape(n, h + 1, w + 1, 2, 2, c_out)
    rows = [jnp.stack([z[:, a:a + h, b:b + w, a, b] for b in range(2)], axis=3) for a in range(2)]
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _upsample_conv_subpixel(x, kernel, impl, precision):
    return _upsample_conv_single(x, kernel, precision)


def _upsample_conv_fwd(x, kernel, impl, precision):
    return _upsample_conv_single(x, kernel, precision), (x, kernel)


def _upsample_conv_bwd(impl, precision, res, g):
    # Same linear map, computed as four separate 2x2 convolutions: their gradients (XLA's input
    # gradient, the blocked-matmul kernel gradient) are faster here than those of the fused one.
    x, kernel = res
    _, vjp = jax.vjp(lambda x_, k_: _upsample_conv_phases(x_, k_, impl, precision), x, kernel)
    return vjp(g.astype(x.dtype))


_upsample_conv_subpixel.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _upsample_conv_subpixel_jvp(x, kernel, precision):
    """The sub-pixel form with forward-mode autodiff: same primal (one fused 2x2 convolution)
    and, through the JVP rule's tangent, the same reverse-mode gradient as the ``custom_vjp``
    above when its convolutions are XLA's (the case under jaxdiff's compile options)."""
    return _upsample_conv_single(x, kernel, precision)


@functools.partial(_upsample_conv_subpixel_jvp.defjvp, symbolic_zeros=True)
def _upsample_conv_subpixel_jvp_rule(precision, primals, tangents):
    # The map is bilinear: d f(x, k) = f(dx, k) + f(x, dk). The tangent is written as the four
    # 2x2 convolutions, so its transpose (what reverse mode runs) is their gradients, the faster
    # backward (see _upsample_conv_bwd); with XLA's convolutions, which transpose natively.
    x, kernel = primals
    dx, dk = tangents
    y = _upsample_conv_single(x, kernel, precision)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_upsample_conv_phases(dx, kernel, "xla", precision))
    if not isinstance(dk, SymbolicZero):
        terms.append(_upsample_conv_phases(x, dk, "xla", precision))
    dy = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)
    return y, dy


def upsample2x_conv3x3(x, kernel, *, impl: str = "auto", precision=None):
    """``conv3x3_SAME(nearest_upsample_2x(x), kernel)`` for NHWC ``x`` and an HWIO 3x3 kernel.

    With ``impl="xla"`` (and ``"auto"`` off the CPU backend) this is literally that: repeat
    every pixel 2x2, then ``lax.conv_general_dilated``. With ``"matmul"`` (and ``"auto"`` on
    CPU) it is the sub-pixel form (see the comment above ``_PHASE_ROWS``): 16/36 of the
    multiply-adds, computed on the low-resolution grid, forward as one 2x2 convolution with
    ``4 * C_out`` outputs; the gradient as four 2x2 convolutions through
    :func:`conv_general_dilated` with the same ``impl`` (so ``"auto"`` picks their kernel
    gradient as described in the module docstring).
    Equal to the direct form up to float rounding (measured: < 2e-6 relative for values and
    both gradients).
    """
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"want x (N,H,W,C) and a (3,3,C,C_out) kernel; got {x.shape}, {kernel.shape}")
    if resolve_conv_impl(impl) == "xla":
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return lax.conv_general_dilated(up, kernel, (1, 1), "SAME", dimension_numbers=_NHWC,
                                        precision=precision)
    if impl == "matmul" or (impl == "auto" and not tracing_with_eigen_convolutions()):
        # the four convolutions' kernel gradients may be the blocked custom_vjp: reverse mode only
        return _upsample_conv_subpixel(x, kernel, impl, precision)
    return _upsample_conv_subpixel_jvp(x, kernel, precision)


class UpsampleConv(nn.Module):
    """Nearest 2x upsampling then a 3x3 SAME convolution, as one module (:func:`upsample2x_conv3x3`).

    Parameters ``kernel`` ``(3, 3, C_in, features)`` and ``bias`` ``(features,)`` have the names,
    shapes and initialisers of ``nn.Conv(features, (3, 3))``, so a checkpoint of a network that
    upsampled and then applied ``nn.Conv`` loads unchanged.
    """

    features: int
    conv_impl: str = "auto"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x):
        resolve_conv_impl(self.conv_impl)
        kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
            if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = upsample2x_conv3x3(x, kernel, impl=self.conv_impl, precision=self.precision)
        return y if bias is None else y + bias.reshape((1, 1, 1, -1))
