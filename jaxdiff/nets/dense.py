"""Dense layers whose kernel gradient is summed over blocks of rows on XLA:CPU.

The kernel gradient of ``y = x @ W`` over ``M`` rows (pixels x batch) is ``dW = x^T g``, a
product that contracts the long row axis of both operands. XLA:CPU lays one operand out
transposed for it, and in the UNet that transposed write is fused into the backward pass of the
preceding GroupNorm: the fusion writes a ``(C, M)`` array column by column (30-50 ms of traced
thunk time per 1x1 ``nin_shortcut`` gradient at 32x32x32, ``benchmarks/profile_step.py``; the
product itself, 192 x 64 over 32,768 rows, is 0.8 GFLOP, ~3 ms at this machine's matmul rate). Summing
``x_b^T g_b`` over blocks of :data:`DENSE_GRAD_CHUNK_ROWS` rows in a ``lax.scan`` keeps each
transpose inside a cache-sized block. Train step of the benchmark UNet (8.95M parameters, batch
32, jaxdiff's CPU compile options), medians of 6 interleaved steps in one process: 2,024 ms with
``nn.Dense``, 1,888 ms with this layer (2026-11-30, jax 0.10.2, 2-core machine).

:func:`Dense` returns a ``flax.linen.Dense`` (same parameter names, shapes and initialisers)
whose ``dot_general`` takes this path when ``impl`` resolves to the CPU path
(:func:`jaxdiff.nets.conv.resolve_conv_impl`), the layer sees at least
``2 * DENSE_GRAD_CHUNK_ROWS`` rows and the contraction is the plain ``x @ W``; otherwise it is
``lax.dot_general``. Values are those of ``x @ W``; gradients agree to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from .conv import resolve_conv_impl, sum_over_blocks

__all__ = ["DENSE_GRAD_CHUNK_ROWS", "Dense", "blocked_grad_dot_general"]

DENSE_GRAD_CHUNK_ROWS = 2048
"""Rows per block of the blocked kernel gradient (a divisor of the row count is used)."""


def _kernel_grad_blocked(x2, g2, chunk_rows: int):
    acc = jnp.float64 if x2.dtype == jnp.float64 else jnp.float32

    def block(xc, gc):
        return lax.dot_general(xc, gc, (((0,), (0,)), ((), ())), preferred_element_type=acc)

    return sum_over_blocks(block, (x2, g2), chunk_rows, (x2.shape[1], g2.shape[1]), acc)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_blocked_grad(x, w, chunk_rows):
    return x @ w


def _fwd(x, w, chunk_rows):
    return x @ w, (x, w)


def _bwd(chunk_rows, res, g):
    x, w = res
    dx = lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    dw = _kernel_grad_blocked(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]).astype(x.dtype),
                              chunk_rows)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_blocked_grad.defvjp(_fwd, _bwd)


def blocked_grad_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                             *, impl: str = "auto", chunk_rows: int = DENSE_GRAD_CHUNK_ROWS):
    """``lax.dot_general`` with the blocked kernel gradient for ``x @ W`` on the CPU path."""
    (lc, rc), (lb, rb) = dimension_numbers
    eligible = (
        resolve_conv_impl(impl) == "matmul"
        and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2
        and precision is None and preferred_element_type is None and lhs.dtype == rhs.dtype
        and lhs.size // max(lhs.shape[-1], 1) >= 2 * chunk_rows
    )
    if not eligible:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    return _matmul_blocked_grad(lhs, rhs, chunk_rows)


def Dense(features: int, *, conv_impl: str = "auto", **kwargs: Any) -> nn.Dense:
    """A ``flax.linen.Dense`` whose product is :func:`blocked_grad_dot_general` (``impl=conv_impl``)."""
    resolve_conv_impl(conv_impl)
    return nn.Dense(features, dot_general=functools.partial(blocked_grad_dot_general, impl=conv_impl),
                    **kwargs)
