"""Functional samplers with one signature: ``sampler(denoise, x, grid, *, key=None, **options)``.

See :mod:`jaxdiff.samplers.base` for the contract. ``available()`` lists the registered names;
``get(name)`` returns the function. Each function carries ``order`` (of its ODE part) and
``stochastic``.
"""

from __future__ import annotations

from typing import Callable

from jaxdiff.samplers.ddim import ddim, ddpm
from jaxdiff.samplers.dpm_solver import dpmpp_2m
from jaxdiff.samplers.euler import euler, heun

_REGISTRY: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
}


def available() -> list[str]:
    """Every registered sampler name."""
    return sorted(_REGISTRY)


def get(name: str) -> Callable:
    """The sampler registered as ``name``; unknown names raise a ValueError listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available())}") from None


def register(name: str, fn: Callable) -> Callable:
    """Register a sampler under ``name`` (it must follow the shared signature)."""
    _REGISTRY[name] = fn
    return fn


__all__ = ["available", "get", "register", "ddpm", "ddim", "euler", "heun", "dpmpp_2m"]
