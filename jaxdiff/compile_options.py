"""XLA compiler options jaxdiff compiles its own functions with, and :func:`jit` that applies them.

On the CPU backend, jaxlib 0.10's XLA hands convolutions to YNNPACK (the debug option
``xla_cpu_experimental_ynn_fusion_type`` lists ``LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION``
by default, next to ``DOT``, ``REDUCE`` and ``INDIVIDUAL_DOT``). On the 2-core machine this
project is developed and tested on, YNNPACK ran every convolution with fewer than 128 input or
output channels on *one* thread: a 3x3 conv 64 -> 64 at 16x32x32 took 8.2-8.5 ms whether the
process had one core or two (~145 GFLOP/s), while 128 -> 128 used both (18.2 vs 36.3 ms). With
convolutions left to XLA's own (Eigen) convolution, the same 64 -> 64 conv took 4.8-5.5 ms; at
batch 32 forward 9.5 vs 18.4 ms, input gradient 9.5 vs 18.5 ms, kernel gradient 18.5 vs 76.1 ms
(2026-11-30, jax 0.10.2; ``benchmarks/conv_backward.py``, ``benchmarks/RESULTS.md``).
:data:`CPU_COMPILER_OPTIONS` is jaxlib's default list without the convolution entry, so dots and
reductions keep going to YNNPACK:

    xla_cpu_experimental_ynn_fusion_type = "1,3,4"   # DOT, REDUCE, INDIVIDUAL_DOT

These are per-compilation options (``jax.jit(..., compiler_options=...)``), not process-wide
flags: jaxdiff sets no environment variable and changes nothing for code it does not compile.
jaxdiff's trainer, sampler (:func:`jaxdiff.generate.make_sample_fn`) and evaluation compile
through :func:`jit`; code that imports jaxdiff's models or samplers gets the same by compiling
with :func:`jit` instead of ``jax.jit``. (``jax.jit(f, compiler_options=compiler_options())`` or
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_dot`` give the same
convolutions, but ``conv_impl="auto"`` cannot see them and keeps the blocked kernel gradient:
24.9 vs 18.5 ms at 64 channels, 32x32, batch 32.)

Off the CPU backend :func:`compiler_options` is empty. On CPU it is also empty when

* ``JAXDIFF_CPU_COMPILER_OPTIONS=0`` is set in the environment (opt out), or
* ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins), or
* this jaxlib does not know the option (checked once by compiling a one-op function), or
* the installed jaxlib's (major, minor) is not in :data:`VERIFIED_JAXLIB` (the option replaces
  jaxlib's whole default list, which was checked on 0.10 only).

While :func:`jit` traces a function it compiles with the options,
:func:`tracing_with_eigen_convolutions` is True; ``conv_impl="auto"`` (:mod:`jaxdiff.nets.conv`)
reads it to pick the kernel gradient, so a plain ``jax.jit`` of the same model (YNNPACK
convolutions) keeps the blocked kernel gradient that is fastest there. (A ``jit`` nested inside a
plain ``jax.jit`` is compiled with the outer function's options: there the flag is wrong, and
the kernel gradient is XLA's under YNNPACK, slower by 3x at 64 channels.)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Any, Callable

import jax

__all__ = [
    "CPU_COMPILER_OPTIONS", "VERIFIED_JAXLIB", "compiler_options", "cpu_convolutions_on_eigen", "jit",
    "tracing_with_eigen_convolutions",
]

CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": "1,3,4"}
"""jaxlib's default YNNPACK fusion types (DebugOptions.LibraryFusionType: DOT = 1, REDUCE = 3,
INDIVIDUAL_DOT = 4) without INDIVIDUAL_CONVOLUTION = 5."""

VERIFIED_JAXLIB: tuple[tuple[int, int], ...] = ((0, 10),)
"""jaxlib (major, minor) releases whose default list this was checked against. The option
replaces the whole list, so on another release (whose default may differ) it is not applied."""

_ENV_OPT_OUT = "JAXDIFF_CPU_COMPILER_OPTIONS"
_TRACING = contextvars.ContextVar("jaxdiff_tracing_with_eigen_convolutions", default=False)


def _jaxlib_verified() -> bool:
    import jaxlib

    try:
        major, minor = (int(p) for p in jaxlib.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) in VERIFIED_JAXLIB


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib compiles a one-op function with these options."""
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=dict(items))
        return True
    except (jax.errors.JaxRuntimeError, ValueError, TypeError) as e:  # an unknown option name
        warnings.warn(f"jaxdiff: this jaxlib rejects the CPU compiler options {dict(items)} ({e}); "
                      "compiling without them", RuntimeWarning, stacklevel=3)
        return False


def _user_opted_out() -> bool:
    if os.environ.get(_ENV_OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return True
    flags = os.environ.get("XLA_FLAGS", "")
    return any(k in flags for k in CPU_COMPILER_OPTIONS)


def cpu_convolutions_on_eigen(backend: str | None = None) -> bool:
    """Whether :func:`jit` applies :data:`CPU_COMPILER_OPTIONS` (convolutions on XLA's own kernels).

    True on the CPU backend with a jaxlib in :data:`VERIFIED_JAXLIB`, unless opted out (see the
    module docstring); False elsewhere.
    """
    backend = backend or jax.default_backend()
    if backend != "cpu" or _user_opted_out() or not _jaxlib_verified():
        return False
    return _accepted(tuple(sorted(CPU_COMPILER_OPTIONS.items())))


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The ``compiler_options`` jaxdiff compiles with: :data:`CPU_COMPILER_OPTIONS` on CPU, else ``{}``."""
    return dict(CPU_COMPILER_OPTIONS) if cpu_convolutions_on_eigen(backend) else {}


def tracing_with_eigen_convolutions() -> bool:
    """True while :func:`jit` traces a function that it compiles with :data:`CPU_COMPILER_OPTIONS`.

    ``conv_impl="auto"`` (:mod:`jaxdiff.nets.conv`) reads it to pick the kernel gradient that is
    fastest under the compilation at hand; a plain ``jax.jit`` traces with it False.
    """
    return _TRACING.get()


@contextlib.contextmanager
def _tracing(flag: bool):
    token = _TRACING.set(flag)
    try:
        yield
    finally:
        _TRACING.reset(token)


def jit(fun: Callable | None = None, **kwargs: Any):
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options` added (``kwargs``' own
    ``compiler_options`` entries take precedence). Usable as ``@jit`` or ``@jit(**kwargs)``.

    The options are chosen for ``kwargs["backend"]`` if given, else the default backend. While
    the function is traced, :func:`tracing_with_eigen_convolutions` says whether they apply.
    """
    if fun is None:
        return functools.partial(jit, **kwargs)
    opts = compiler_options(kwargs.get("backend"))
    opts.update(kwargs.pop("compiler_options", None) or {})
    ynn_key = next(iter(CPU_COMPILER_OPTIONS))
    eigen = opts.get(ynn_key) == CPU_COMPILER_OPTIONS[ynn_key]

    @functools.wraps(fun)
    def traced(*args, **kw):
        with _tracing(eigen):
            return fun(*args, **kw)

    return jax.jit(traced, compiler_options=opts or None, **kwargs)
