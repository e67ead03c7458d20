"""jaxdiff.compile_options: the per-compilation XLA options jaxdiff's own jitted functions use.

The check that matters is on the compiled HLO: with the options, no convolution is handed to
YNNPACK (no convolution inside a ``__ynn_fusion`` computation) while dots still are; results are
those of a plain ``jax.jit`` to float rounding.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff import compile_options as CO
from jaxdiff.nets import UNet

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU-only options")


def _ynn_computations(hlo: str) -> list[str]:
    """Bodies of the computations the compiled module runs as ``__ynn_fusion`` fusions."""
    names = set(re.findall(r'calls=%([\w.\-]+)[^\n]*"kind":"__ynn_fusion', hlo))
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    return [bodies[n] for n in names if n in bodies]


def _conv_then_dot(x, k, w):
    y = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(y + 1.0).reshape(-1, y.shape[-1]) @ w


def _args():
    r = np.random.default_rng(0)
    return (jnp.asarray(r.standard_normal((2, 16, 16, 64)), jnp.float32),
            jnp.asarray(r.standard_normal((3, 3, 64, 64)) / 24, jnp.float32),
            jnp.asarray(r.standard_normal((64, 64)) / 8, jnp.float32))


@on_cpu
def test_cpu_options_and_opt_outs(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert CO.compiler_options() == {"xla_cpu_experimental_ynn_fusion_type": "1,3,4"}
    assert CO.cpu_convolutions_on_eigen()
    assert CO.compiler_options("gpu") == {} and CO.compiler_options("tpu") == {}
    monkeypatch.setenv("JAXDIFF_CPU_COMPILER_OPTIONS", "0")
    assert CO.compiler_options() == {} and not CO.cpu_convolutions_on_eigen()
    monkeypatch.setenv("JAXDIFF_CPU_COMPILER_OPTIONS", "1")
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")  # the user's choice wins
    assert CO.compiler_options() == {}


@on_cpu
def test_jit_keeps_convolutions_out_of_ynnpack_and_dots_in(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    hlo = CO.jit(_conv_then_dot).lower(*_args()).compile().as_text()
    ynn = _ynn_computations(hlo)
    assert "convolution(" in hlo
    assert not any("convolution(" in body for body in ynn), "a convolution went to YNNPACK"
    assert any(" dot(" in body for body in ynn), "dots should stay on YNNPACK (DOT fusion type)"
    # Caller's compiler_options are merged in, theirs winning: "" = no YNNPACK fusion at all.
    hlo = CO.jit(_conv_then_dot, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""}).lower(
        *_args()).compile().as_text()
    assert not _ynn_computations(hlo)


@on_cpu
@pytest.mark.slow  # ~37 s on CI's CPU
def test_results_as_accurate_as_plain_jit():
    """UNet forward and parameter gradients, float32, against a float64 evaluation: with the
    options the median error is unchanged and the worst leaf stays below 1e-4 (3x plain jit's)."""
    net = UNet(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    t = jnp.array([10.0, 700.0])
    params = net.init(jax.random.key(1), x, t)["params"]
    params = jax.tree.map(lambda p: p + 0.01, params)  # zero-init output layers would hide errors

    def value_and_grad(net, p, x, t):
        return jax.value_and_grad(lambda p: jnp.mean(net.apply({"params": p}, x, t) ** 2))(p)

    plain = jax.jit(functools.partial(value_and_grad, net))(params, x, t)
    ours = CO.jit(functools.partial(value_and_grad, net))(params, x, t)
    with jax.enable_x64(True):
        net64 = net.clone(dtype=jnp.float64, param_dtype=jnp.float64)
        to64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), tree)  # noqa: E731
        exact = jax.jit(functools.partial(value_and_grad, net64))(to64(params), to64(x), to64(t))
        exact = jax.tree.map(np.asarray, exact)
        # (the UNet returns float32 and embeds t in float32: the reference is float64 elsewhere)
        assert all(a.dtype == np.float64 for a in jax.tree.leaves(exact[1]))
    exact_leaves = jax.tree.leaves(exact)
    # Leaves whose true gradient is ~0 (a bias in front of a GroupNorm) are measured against 1e-4
    # of the largest leaf instead of their own size.
    floor = 1e-4 * max(float(np.linalg.norm(a)) for a in exact_leaves)

    def errors(tree):
        return np.array([np.linalg.norm(np.asarray(a, np.float64) - e) / max(np.linalg.norm(e), floor)
                         for a, e in zip(jax.tree.leaves(tree), exact_leaves)])

    e_plain, e_ours = errors(plain), errors(ours)
    # Measured (2026-11-30, jax 0.10.2, 2-core CPU): median 6.5e-7 (plain jit 7.1e-7); largest
    # 4.0e-5 (plain 1.3e-5), both on an attention k-kernel, whose gradient through a near-uniform
    # softmax is a small difference of large terms and so takes on the rounding of everything
    # upstream.
    assert e_ours.max() < 1e-4, e_ours.max()
    assert np.median(e_ours) < 2 * np.median(e_plain) + 1e-7, (np.median(e_ours), np.median(e_plain))


@on_cpu
def test_unknown_option_is_dropped_with_a_warning(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(CO, "CPU_COMPILER_OPTIONS", {"xla_cpu_no_such_option_jaxdiff_test": "1"})
    with pytest.warns(RuntimeWarning, match="rejects the CPU compiler options"):
        assert CO.compiler_options() == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once: no second warning, still empty
        assert CO.compiler_options() == {}
    assert float(CO.jit(lambda a: a * 2)(jnp.float32(3))) == 6.0


def test_tracing_flag_is_set_only_inside_compile_options_jit(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    seen = []

    def f(x):
        seen.append(CO.tracing_with_eigen_convolutions())
        return x * 2

    assert float(CO.jit(f)(jnp.float32(1))) == 2.0
    assert float(jax.jit(f)(jnp.float32(1))) == 2.0
    assert float(CO.jit(static_argnums=1)(lambda x, n: f(x) * n)(jnp.float32(1), 3)) == 6.0
    # with the user's own ynn setting the options (and the flag) are not ours
    assert float(CO.jit(f, compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})(jnp.float32(1))) == 2.0
    want = jax.default_backend() == "cpu"
    assert seen == [want, False, want, False]
    assert not CO.tracing_with_eigen_convolutions()


@on_cpu
def test_unverified_jaxlib_gets_no_options(monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(CO, "VERIFIED_JAXLIB", ((0, 0),))
    assert CO.compiler_options() == {}


@on_cpu
def test_sampler_compiles_with_the_options(monkeypatch):
    """make_sample_fn (the sampler the CLI and eval use) goes through compile_options.jit."""
    import ml_collections

    from jaxdiff.config_base import base_config
    from jaxdiff.generate import make_sample_fn
    from jaxdiff.modeling import build_model

    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    c = base_config()
    c.data.image_size, c.data.channels = 16, 3
    c.model = ml_collections.ConfigDict(dict(name="unet", ch=64, ch_mult=(1, 2), num_res_blocks=1,
                                             attn_resolutions=(), dropout=0.0, norm_groups=16))
    model = build_model(c)
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1,)))["params"]
    fn = make_sample_fn(c, model, "ddim", 2, 2)
    hlo = fn.lower(params, jax.random.key(1), None).compile().as_text()
    assert "convolution(" in hlo
    assert not any("convolution(" in body for body in _ynn_computations(hlo))
