"""Shared helpers for tests: load repo configs by path, run the CLI in a fresh process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str = ""):
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant) if variant else mod.get_config()


def run_python(args, *, env_extra=None, cache_dir=None, timeout=600):
    """Run ``python args...`` in a fresh process from the repo root; returns CompletedProcess."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    if cache_dir:
        # Persistent compilation cache: later processes reuse the first one's executables.
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"python {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def save_random_vae(path, config: dict, seed: int = 0, noise: float = 0.05):
    """A diffusers ``AutoencoderKL(**config)`` with every weight moved by ``noise`` * N(0, 1) (away
    from diffusers' zero / identity initialisations), saved as safetensors in ``path``; returns it."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(noise * torch.randn_like(p))
    ref.save_pretrained(str(path), safe_serialization=True)
    return ref
