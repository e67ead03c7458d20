"""Shared pieces of the jaxdiff-vs-PyTorch benchmarks (scripts, not tests).

* :func:`machine_info` -- CPU model, cores, load average, versions of jax / jaxlib / flax /
  torch / diffusers, XLA flags and thread counts;
* :func:`median_time` -- median wall time of ``fn()`` over repeats after warm-up, with
  ``jax.block_until_ready`` on the result;
* :data:`UNET` and :func:`diffusers_unet_config` -- one UNet configuration expressed for
  jaxdiff's :class:`jaxdiff.nets.UNet` and for diffusers' ``UNet2DModel``;
* :func:`matmul_peak_jax`, :func:`compiled_flops`, :func:`roofline` -- the measured float32
  matmul peak, model FLOPs from XLA's cost analysis, and each side's FLOP rate as a fraction of
  that peak (with the fraction a speed-up target would need);
* :func:`emit` -- print a result dict as one JSON line (and append it to ``--json`` if given);
* :func:`add_precision_args`, :func:`torch_device`, :func:`torch_autocast` -- the ``--dtype``
  and ``--torch-device`` options of the side-by-side scripts: on a GPU machine the PyTorch
  reference runs on the GPU too, in the same compute dtype (bf16 autocast for ``bfloat16``).

Thread counts: XLA:CPU runs its intra-op work on one thread per core (2 here); the scripts call
``torch.set_num_threads(THREADS)`` with the same count. No XLA flags are set by the scripts;
``XLA_FLAGS`` from the environment is recorded in the machine info.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

THREADS = os.cpu_count() or 1

# One UNet, in jaxdiff's fields. DDPM architecture (Ho et al. 2020) at a CPU-sized width:
# 4 levels, 2 residual blocks per level, single-head self-attention at 16x16 and in the middle.
# norm_groups=16 so that every GroupNorm has the same group count in both implementations
# (diffusers uses norm_num_groups for every norm, jaxdiff the largest divisor <= norm_groups
# leaving >= 4 channels per group; for multiples of 64 channels both give 16).
UNET = dict(
    name="unet", ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
    dropout=0.1, norm_groups=16,
)
IMAGE_SIZE, CHANNELS = 32, 3


def diffusers_unet_config(unet: dict = UNET, image_size: int = IMAGE_SIZE, channels: int = CHANNELS):
    """diffusers ``UNet2DModel`` kwargs for the jaxdiff UNet fields ``unet``.

    The mapping is the one of diffusers' own DDPM conversion (``google/ddpm-cifar10-32``):
    positional time embedding with ``flip_sin_to_cos=False, freq_shift=1``, ``norm_eps=1e-6``,
    ``downsample_padding=0`` (TF "SAME" for the stride-2 conv), one attention head of full
    width, ``AttnDownBlock2D`` / ``AttnUpBlock2D`` at the attention resolutions.
    """
    levels = len(unet["ch_mult"])
    res = [image_size // 2**i for i in range(levels)]
    attn = set(unet["attn_resolutions"])
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in res)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(res))
    return dict(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(unet["ch"] * m for m in unet["ch_mult"]),
        down_block_types=down, up_block_types=up, layers_per_block=unet["num_res_blocks"],
        attention_head_dim=None, norm_num_groups=unet["norm_groups"], norm_eps=1e-6,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
        time_embedding_type="positional", dropout=unet["dropout"],
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001 -- a missing optional package is reported as None
        return None


def machine_info() -> dict[str, Any]:
    """Machine and software description, recorded with every result."""
    import jax

    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1_5_15": load_average(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "jax_backend": jax.default_backend(),
        "jax_devices": sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}),
        "jax_device_count": jax.device_count(),
        "torch_cuda": _torch_cuda_name(),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "torch_threads": THREADS,
    }


def set_cpu_devices(n: int | None) -> None:
    """Expose ``n`` XLA host-platform devices (``--xla_force_host_platform_device_count``).

    Must run before jax is imported. jaxdiff's sampler and trainer lay the batch over every
    device, so on a CPU this runs the batch as ``n`` data-parallel shards on the same cores
    (same total work); ``n=None`` leaves the environment as it is.
    """
    if not n:
        return
    if "jax" in sys.modules:
        raise RuntimeError("set_cpu_devices must run before jax is imported")
    flag = f"--xla_force_host_platform_device_count={int(n)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _torch_cuda_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    except Exception:  # noqa: BLE001 -- no torch, or no usable CUDA: reported as None
        pass
    return None


def add_precision_args(ap, torch_side: bool = True) -> None:
    """``--dtype`` (compute dtype of both sides) and ``--torch-device`` (where PyTorch runs)."""
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute dtype: jaxdiff's model dtype; PyTorch under autocast for "
                         "bfloat16 (parameters and optimizer state stay float32 on both sides)")
    if torch_side:
        ap.add_argument("--torch-device", default="auto",
                        help="cpu, cuda, or auto: cuda when jax runs on a GPU and torch sees one")


def torch_device(name: str = "auto"):
    """The ``torch.device`` of the PyTorch reference. ``auto`` puts it where jax runs: on the
    GPU when jax's default backend is a GPU and torch sees CUDA, else on the CPU. On CUDA,
    TF32 is allowed for float32 matmuls and convolutions, as XLA:GPU's default precision does."""
    import jax

    torch = setup_torch()
    if name == "auto":
        name = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return dev


def torch_autocast(device, dtype: str):
    """``torch.autocast`` to bf16 for ``dtype="bfloat16"``, a no-op context for float32."""
    import torch

    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return torch


def median_time(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1) -> dict[str, Any]:
    """Median wall time of ``fn()`` (its result passed to ``jax.block_until_ready``).

    Returns ``{"median_s", "times_s", "warmup_s", "median_cpu_s"}``; ``warmup_s`` includes any
    compilation; ``median_cpu_s`` is the process CPU time (all threads) per call.
    """
    import jax

    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        warm.append(time.perf_counter() - t0)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {
        "median_s": statistics.median(times),
        "times_s": [round(t, 4) for t in times],
        "warmup_s": [round(t, 3) for t in warm],
        # Process CPU time (all threads) per call: on a machine shared with other jobs,
        # cpu_s / cores is a rough stand-in for the unloaded wall time.
        "median_cpu_s": statistics.median(cpu),
    }


def count_torch_params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def emit(result: dict[str, Any], json_path: str | None = None) -> None:
    """Print ``result`` as one JSON line on stdout (and append it to ``json_path``)."""
    line = json.dumps(result, default=str)
    print(line)
    sys.stdout.flush()
    if json_path:
        with open(json_path, "a") as f:
            f.write(line + "\n")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def matmul_peak_jax(n: int, repeats: int, dtype: str = "float32") -> dict:
    """Measured peak: median FLOP/s of an ``n`` x ``n`` matmul in ``dtype`` (2 n^3 FLOPs; bf16
    operands accumulate in float32), with the backend's default precision."""
    import jax
    import jax.numpy as jnp

    dt = jnp.dtype(dtype)
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dt)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    t = median_time(lambda: f(a, b), repeats=repeats, warmup=1)
    return dict(t, flops_per_s=2.0 * n**3 / t["median_s"], n=n, dtype=dtype)


def matmul_peak_torch(n: int, repeats: int, dtype: str = "float32", device: str = "auto") -> dict:
    """PyTorch's rate for the same matmul on its device (for reference)."""
    torch = setup_torch()
    dev = torch_device(device)
    a = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=dev, dtype=getattr(torch, dtype))

    def product():  # the product alone, then wait for the device (a CPU matmul returns done)
        c = a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return None

    t = median_time(product, repeats=repeats, warmup=1)
    return dict(t, flops_per_s=2.0 * n**3 / t["median_s"], n=n, dtype=dtype, device=str(dev))


def compiled_flops(compiled) -> float:
    """FLOPs of a compiled (or, for :func:`hlo_flops`, lowered) computation, from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def hlo_flops(lowered) -> float:
    """FLOPs of the step's HLO before XLA's optimisations: the same program on every backend.
    On a GPU the optimised executable's matmuls and convolutions are cuBLAS / cuDNN custom calls,
    which XLA's cost analysis may not count (jax-ml/jax#22249), so the GPU's model FLOPs come from
    here. (On this CPU, the train step of a small UNet -- ch 16, two levels, batch 2 -- counted
    1.063 GFLOP here vs 1.086 compiled.)"""
    return compiled_flops(lowered)


def roofline(name: str, flops_per_call: float, seconds: dict[str, float], peak: dict,
             reference: str, target: float) -> dict[str, Any]:
    """How the measured calls compare with the machine's measured matmul peak.

    ``flops_per_call``: model FLOPs of one timed call (XLA's cost analysis of the network as
    defined); ``seconds``: median seconds per call of each side; ``peak``: a
    :func:`matmul_peak_jax` result from the same run. Logs each side's model FLOP/s as a fraction
    of the peak and the fraction that ``target`` times the ``reference`` side's speed would need:
    above 100%, the target asks for more than a float32 matmul of the same FLOPs achieves here.
    """
    p = peak["flops_per_s"]
    out: dict[str, Any] = dict(model_flops_per_call=flops_per_call, peak_flops_per_s=p,
                               peak_matmul_n=peak["n"], target=target, reference=reference)
    log(f"[{name}] model FLOPs per call: {flops_per_call / 1e9:.1f} GFLOP; jax {peak['dtype']} "
        f"{peak['n']}^2 matmul peak (this run): {p / 1e9:.1f} GFLOP/s")
    for side, s in seconds.items():
        rate = flops_per_call / s
        out[f"{side}_flops_per_s"] = rate
        out[f"{side}_fraction_of_peak"] = rate / p
        log(f"[{name}] {side}: {rate / 1e9:.1f} model GFLOP/s = {100 * rate / p:.1f}% of the peak")
    need = target * flops_per_call / seconds[reference]
    out["target_flops_per_s"] = need
    out["target_fraction_of_peak"] = need / p
    log(f"[{name}] {target:g}x {reference} needs {need / 1e9:.1f} model GFLOP/s = "
        f"{100 * need / p:.1f}% of the peak")
    return out
