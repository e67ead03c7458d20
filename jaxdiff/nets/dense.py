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
from jax.custom_derivatives import SymbolicZero

from .conv import block_rows, resolve_conv_impl

__all__ = ["DENSE_GRAD_CHUNK_ROWS", "Dense", "blocked_grad_dot_general"]

DENSE_GRAD_CHUNK_ROWS = 2048
"""Rows per block of the blocked kernel gradient (a divisor of the row count is used)."""


def _blocked_matmul(x, w, chunk_rows: int):
    """``x @ w`` computed block by block over the rows in a ``lax.map``.

    Used for the tangent ``x @ dW`` below: it is linear in ``w``, and its transpose (what reverse
    mode runs) is a ``lax.scan`` over the same blocks accumulating ``x_b^T g_b`` -- the blocked
    kernel gradient, with the row blocks of ``x`` as its only residuals.
    """
    lead, c_in = x.shape[:-1], x.shape[-1]
    acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32  # bf16: sum the blocks in float32
    x2 = x.reshape(-1, c_in)
    m = x2.shape[0]
    chunk = block_rows(m, chunk_rows)
    wa = w.astype(acc)
    # rematerialised, so that for bf16 x reverse mode keeps x itself, not a float32 copy of it
    block = jax.checkpoint(lambda xc, wa: xc.astype(acc) @ wa)
    if chunk == m:
        y = block(x2, wa)
    else:
        y = lax.map(lambda xc: block(xc, wa), x2.reshape(m // chunk, chunk, c_in))
    return y.reshape(*lead, w.shape[-1]).astype(x.dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _matmul_blocked_grad(x, w, chunk_rows):
    return x @ w


@functools.partial(_matmul_blocked_grad.defjvp, symbolic_zeros=True)
def _matmul_blocked_grad_jvp(chunk_rows, primals, tangents):
    # d(x @ W) = dx @ W + x @ dW. Forward mode evaluates this; reverse mode transposes it: dx @ W
    # gives g @ W^T, and the blocked x @ dW gives dW = sum_b x_b^T g_b (accumulated in float32
    # for bf16 inputs, as a float32 tangent).
    x, w = primals
    dx, dw = tangents
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(dx @ w)
    if not isinstance(dw, SymbolicZero):
        terms.append(_blocked_matmul(x, dw, chunk_rows))
    y = x @ w
    return y, (sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y))


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
