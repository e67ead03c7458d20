"""Rectified flow (linear interpolant, velocity prediction, logit-normal t) on the digits."""

from jaxdiff.config_base import base_config

import importlib.util
import os

_spec = importlib.util.spec_from_file_location("_digits", os.path.join(os.path.dirname(__file__), "digits.py"))
_digits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_digits)


def get_config(variant: str = ""):
    c = _digits.get_config(variant)
    c.diffusion.process = {"name": "rectified_flow"}
    c.diffusion.prediction = "velocity"
    c.diffusion.t_density = "logit_normal"
    c.sample.sampler = "euler"
    c.sample.steps = 50 if not variant else 4
    return c
