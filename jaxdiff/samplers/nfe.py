"""The number of function (denoiser) evaluations, NFE, of a sampler run.

Papers compare samplers at equal NFE (DPM-Solver, Lu et al. 2022, Tables 3-4; UniPC, Zhao et al.
2023; EDM, Karras et al. 2022, Fig. 2): a 2nd-order singlestep method such as Heun spends two
evaluations per step (EDM's Heun spends 2N - 1: no correction on the last step), a multistep one
a single evaluation. :func:`count_nfe` counts them instead of trusting a formula: it runs the
sampler once, compiled, on a tiny input with a closed-form denoiser that increments a host-side
counter each time it is evaluated (``jax.debug.callback``), so branches that ``lax.cond`` skips
are not counted. Classifier-free guidance (:mod:`jaxdiff.guidance`) evaluates both branches in
one batched call per evaluation and leaves the NFE unchanged, as the papers count it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["count_nfe", "ADAPTIVE"]

# Samplers whose number of evaluations depends on the model (error-controlled step sizes):
# ``pf_ode_adaptive(..., return_nfe=True)`` reports the NFE of each run.
ADAPTIVE = ("pf_ode_adaptive",)


def count_nfe(sampler: str | Callable, grid, *, key=None, **options) -> int:
    """Denoiser evaluations of one ``sampler(denoise, x, grid, key=key, **options)`` call.

    Fixed-step samplers evaluate the denoiser the same number of times whatever it returns, so
    the count made with a stand-in (a data distribution N(0, 1/4) per coordinate, two
    coordinates) holds for any model on the same grid and options. Adaptive samplers (names in
    :data:`ADAPTIVE`) are refused: their count is a property of the model."""
    from jaxdiff.samplers import get  # here: the package imports this module

    name = sampler if isinstance(sampler, str) else getattr(sampler, "__name__", "")
    if name in ADAPTIVE:
        raise ValueError(f"{name} chooses its steps by error control, so its NFE depends on the model: call it with "
                         "return_nfe=True to get the NFE of a run")
    fn = get(sampler) if isinstance(sampler, str) else sampler
    calls = []

    def tick(_):
        calls.append(1)  # list.append is atomic, should callbacks ever run on several threads

    def denoise(x, t):
        jax.debug.callback(tick, t)
        a, s = grid.process.alpha(t), grid.process.sigma(t)
        return a * 0.25 / (a * a * 0.25 + s * s) * x  # E[x0 | x_t] for x0 ~ N(0, 1/4)

    key = jax.random.key(0) if key is None else key
    x = jnp.zeros((1, 2), jnp.float32)
    jax.block_until_ready(jax.jit(lambda x, key: fn(denoise, x, grid, key=key, **options))(x, key))
    jax.effects_barrier()
    return len(calls)
