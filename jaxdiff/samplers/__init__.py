"""Functional samplers with one signature: ``sampler(denoise, x, grid, *, key=None, **options)``.

See :mod:`jaxdiff.samplers.base` for the contract. ``available()`` lists the registered names;
``get(name)`` returns the function. Each function carries ``order`` (of its ODE part) and
``stochastic``. ``count_nfe(name, grid, **options)`` counts the denoiser evaluations of a run.
"""

from __future__ import annotations

from typing import Callable

from jaxdiff.samplers.ddim import ddim, ddpm
from jaxdiff.samplers.ancestral import dpm2, dpm2_ancestral, dpmpp_2s_ancestral, euler_ancestral
from jaxdiff.samplers.dpm_solver import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde, dpmpp_sde
from jaxdiff.samplers.euler import euler, heun
from jaxdiff.samplers.deis import deis
from jaxdiff.samplers.pndm import plms, pndm
from jaxdiff.samplers.singlestep import dpm_solver
from jaxdiff.samplers.unipc import unipc
from jaxdiff.samplers.linear_multistep import ipndm, ipndm_v, lms
from jaxdiff.samplers.sde import reverse_sde_pc
from jaxdiff.samplers.adaptive import pf_ode_adaptive
from jaxdiff.samplers.flow import flow_euler, flow_heun
from jaxdiff.samplers.consistency import consistency_multistep
from jaxdiff.samplers.api import sample
from jaxdiff.samplers.nfe import count_nfe

_REGISTRY: dict[str, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpm_solver": dpm_solver,
    "unipc": unipc,
    "deis": deis,
    "pndm": pndm,
    "plms": plms,
    "euler_ancestral": euler_ancestral,
    "dpm2": dpm2,
    "dpm2_ancestral": dpm2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "dpmpp_sde": dpmpp_sde,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m": dpmpp_3m,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "lms": lms,
    "ipndm": ipndm,
    "ipndm_v": ipndm_v,
    "reverse_sde_pc": reverse_sde_pc,
    "pf_ode_adaptive": pf_ode_adaptive,
    "flow_euler": flow_euler,
    "flow_heun": flow_heun,
    "consistency_multistep": consistency_multistep,
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


__all__ = ["available", "get", "register", "ddpm", "ddim", "euler", "heun", "dpmpp_2m",
           "euler_ancestral", "dpm2", "dpm2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
           "dpmpp_3m", "dpmpp_3m_sde", "lms", "ipndm", "ipndm_v",
           "dpm_solver", "unipc", "deis", "pndm", "plms", "reverse_sde_pc", "pf_ode_adaptive", "flow_euler",
           "flow_heun", "consistency_multistep", "sample", "count_nfe"]
