"""The CPU convolution paths (jaxdiff.nets.conv) against lax.conv_general_dilated.

Reference: XLA's own convolution and its autodiff gradients (``lax.conv_general_dilated``),
an independent implementation of the same operator.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from jaxdiff import compile_options
from jaxdiff.nets import UNet
from jaxdiff.nets.conv import (
    Conv,
    UpsampleConv,
    conv_general_dilated,
    resolve_conv_impl,
    upsample2x_conv3x3,
    uses_matmul_grad,
)

DN = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def _grads(fn, x, k, b, g):
    def f(x, k, b):
        return fn(x, k) + b[None, None, None, :]

    y, vjp = jax.vjp(f, x, k, b)
    return (y,) + vjp(g)


def _assert_same_values_and_grads(ref_fn, new_fn, x, k, b, g, tol=1e-5):
    """``ref_fn(x, k) + b`` and ``new_fn(x, k) + b``: outputs and all three gradients agree."""
    ref = jax.jit(lambda *a: _grads(ref_fn, *a))(x, k, b, g)
    new = jax.jit(lambda *a: _grads(new_fn, *a))(x, k, b, g)
    for name, r, n in zip(("output", "d_input", "d_kernel", "d_bias"), ref, new):
        assert r.shape == n.shape, name
        assert _rel(r, n) < tol, (name, _rel(r, n))


# (batch, H, W, C_in, C_out, kernel, stride, padding): UNet channel counts (conv_in 3->128,
# 128->128, 128->256, 256->256), the stride-2 downsample, a 1x1, DiT's patchify, odd sizes,
# explicit asymmetric padding; the last two have more than KERNEL_GRAD_CHUNK_PIXELS output pixels
# in the batch, so the kernel gradient is summed over batch blocks (blocks of 2 and of 1 images).
CASES = [
    (2, 8, 8, 3, 128, 3, 1, "SAME"),
    (2, 8, 8, 128, 128, 3, 1, "SAME"),
    (1, 4, 4, 128, 256, 3, 1, "SAME"),
    (2, 8, 8, 256, 256, 3, 2, "SAME"),
    (2, 6, 6, 16, 8, 1, 1, "SAME"),
    (2, 8, 8, 4, 24, 2, 2, "VALID"),
    (3, 9, 7, 5, 6, 3, 2, "VALID"),
    (1, 6, 5, 4, 4, 3, 1, ((2, 0), (1, 1))),
    (6, 32, 32, 8, 8, 3, 1, "SAME"),
    (7, 40, 40, 4, 6, 3, 2, "VALID"),
]


@pytest.mark.parametrize("case", CASES, ids=[str(c[:8]) for c in CASES])
def test_forward_and_gradients_match_lax(case):
    bsz, h, w, cin, cout, ks, s, pad = case
    kx, kk, kb, kg = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (bsz, h, w, cin))
    k = jax.random.normal(kk, (ks, ks, cin, cout)) / np.sqrt(ks * ks * cin)
    b = jax.random.normal(kb, (cout,))
    ref_fn = lambda x, k: lax.conv_general_dilated(x, k, (s, s), pad, dimension_numbers=DN)  # noqa: E731
    new_fn = lambda x, k: conv_general_dilated(  # noqa: E731
        x, k, (s, s), pad, dimension_numbers=DN, impl="matmul"
    )
    out_shape = jax.eval_shape(ref_fn, x, k).shape
    g = jax.random.normal(kg, out_shape)
    _assert_same_values_and_grads(ref_fn, new_fn, x, k, b, g)


def test_custom_vjp_is_actually_used():
    """The kernel gradient of the fast path contains no convolution (it is matmuls)."""
    x = jnp.ones((1, 4, 4, 2))
    k = jnp.ones((3, 3, 2, 2))
    f = lambda impl: lambda k: conv_general_dilated(  # noqa: E731
        x, k, (1, 1), "SAME", dimension_numbers=DN, impl=impl
    ).sum()
    fast = jax.jit(jax.grad(f("matmul"))).lower(k).as_text()
    native = jax.jit(jax.grad(f("xla"))).lower(k).as_text()
    assert "convolution" in native
    assert "convolution" not in fast and "dot_general" in fast


def test_vmap_and_second_use_under_grad():
    """vmap over an extra batch axis and grad of a function of the gradient-path output."""
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (3, 2, 6, 6, 4))
    k = jax.random.normal(kk, (3, 3, 4, 8)) * 0.2

    def loss(impl):
        def per(xi, k):
            y = conv_general_dilated(xi, k, (1, 1), "SAME", dimension_numbers=DN, impl=impl)
            return jnp.sum(jnp.tanh(y) ** 2)

        return lambda k: jax.vmap(per, in_axes=(0, None))(x, k).sum()

    g_ref = jax.jit(jax.grad(loss("xla")))(k)
    g_new = jax.jit(jax.grad(loss("matmul")))(k)
    assert _rel(g_ref, g_new) < 1e-5


def test_bfloat16_close_to_lax():
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, 8, 8, 32)).astype(jnp.bfloat16)
    k = (jax.random.normal(kk, (3, 3, 32, 16)) * 0.1).astype(jnp.bfloat16)

    def grads(impl):
        f = lambda x, k: conv_general_dilated(  # noqa: E731
            x, k, (1, 1), "SAME", dimension_numbers=DN, impl=impl
        ).astype(jnp.float32).sum()
        return jax.jit(jax.grad(f, argnums=(0, 1)))(x, k)

    ref, new = grads("xla"), grads("matmul")
    assert new[1].dtype == jnp.bfloat16 and new[0].dtype == jnp.bfloat16
    assert _rel(ref[0], new[0]) < 1e-2
    assert _rel(ref[1], new[1]) < 1e-2


def test_flax_conv_params_identical_to_nn_conv():
    x = jnp.ones((1, 8, 8, 3))
    ours = Conv(16, (3, 3), strides=(2, 2), padding="SAME", conv_impl="matmul")
    theirs = nn.Conv(16, (3, 3), strides=(2, 2), padding="SAME")
    p1 = ours.init(jax.random.key(0), x)
    p2 = theirs.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, p1) == jax.tree.map(jnp.shape, p2)
    xr = jax.random.normal(jax.random.key(3), x.shape)
    np.testing.assert_allclose(ours.apply(p2, xr), theirs.apply(p2, xr), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_unet_gradients_same_for_both_impls():
    """A whole (tiny) UNet: parameter gradients of conv_impl='matmul' equal those of 'xla'."""
    x = jax.random.normal(jax.random.key(4), (2, 8, 8, 1))
    t = jnp.array([3.0, 500.0])
    kw = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    ref_model = UNet(**kw, conv_impl="xla")

    @jax.jit
    def init(key):
        params = ref_model.init(key, x, t)["params"]
        # conv2 / conv_out are zero-initialised; perturb every parameter so all gradients flow.
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(6), len(leaves))
        return jax.tree.unflatten(
            tree, [p + 0.05 * jax.random.normal(kk, p.shape) for p, kk in zip(leaves, keys)]
        )

    params = init(jax.random.key(5))

    def grad_of(impl):
        model = UNet(**kw, conv_impl=impl)
        loss = lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t) - x))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    g_ref, g_new = grad_of("xla"), grad_of("matmul")
    # A leaf whose exact gradient is zero (the attention key bias: softmax is invariant to adding
    # q.b to every logit of a row) holds rounding noise only; compare it on the scale of the
    # largest gradient instead of its own.
    floor = 1e-4 * max(float(np.linalg.norm(np.asarray(a))) for a in jax.tree.leaves(g_ref))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_new)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(a), floor)
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("jitter", ["compile_options.jit", "jax.jit"])
def test_backend_selection_and_errors(jitter, monkeypatch):
    monkeypatch.delenv("JAXDIFF_CPU_COMPILER_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    jit = compile_options.jit if jitter == "compile_options.jit" else jax.jit
    assert resolve_conv_impl("xla") == "xla"
    assert resolve_conv_impl("matmul") == "matmul"
    expected = "matmul" if jax.default_backend() == "cpu" else "xla"
    assert resolve_conv_impl("auto") == expected
    with pytest.raises(ValueError, match="conv_impl"):
        resolve_conv_impl("cudnn")
    with pytest.raises(ValueError, match="conv_impl"):
        UNet(ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), conv_impl="bad").init(
            jax.random.key(0), jnp.ones((1, 4, 4, 1)), jnp.zeros((1,))
        )
    # Ineligible convolutions fall back to lax (dilation, groups, NCHW).
    assert not uses_matmul_grad(4, DN, rhs_dilation=(2, 2))
    assert not uses_matmul_grad(4, DN, feature_group_count=2)
    assert not uses_matmul_grad(4, ("NCHW", "OIHW", "NCHW"))
    assert not uses_matmul_grad(3, ("NWC", "WIO", "NWC"))
    assert uses_matmul_grad(4, DN)
    # "auto" on CPU: the tap path only for wide, large convolutions (shape rule).
    def has_conv_in_kernel_grad(shape_x, shape_k):
        f = lambda k: conv_general_dilated(  # noqa: E731
            jnp.ones(shape_x), k, (1, 1), "SAME", dimension_numbers=DN, impl="auto"
        ).sum()
        return "convolution" in jit(jax.grad(f)).lower(jnp.ones(shape_k)).as_text()

    # Traced by compile_options.jit (XLA's own convolutions on CPU), XLA's kernel gradient is the
    # faster one everywhere, so "auto" keeps it; under a plain jax.jit (YNNPACK convolutions) the
    # blocked path where the shape rule says.
    on_cpu = jax.default_backend() == "cpu" and jitter == "jax.jit"
    assert has_conv_in_kernel_grad((1, 32, 32, 128), (3, 3, 128, 128)) != on_cpu
    assert has_conv_in_kernel_grad((1, 32, 32, 64), (3, 3, 64, 64)) != on_cpu
    assert has_conv_in_kernel_grad((1, 16, 16, 128), (3, 3, 128, 128)) != on_cpu
    assert has_conv_in_kernel_grad((1, 8, 8, 128), (3, 3, 128, 128))  # small images: XLA's own
    assert has_conv_in_kernel_grad((1, 32, 32, 32), (3, 3, 32, 32))  # narrow: XLA's own
    assert has_conv_in_kernel_grad((1, 32, 32, 64), (3, 3, 64, 3))  # e.g. the output conv
    x = jax.random.normal(jax.random.key(7), (1, 6, 6, 4))
    k = jax.random.normal(jax.random.key(8), (3, 3, 4, 4))
    y = conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN,
                             impl="matmul")
    y_ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(2, 2),
                                     dimension_numbers=DN)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)


def _upsample_then_conv(x, k):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return lax.conv_general_dilated(up, k, (1, 1), "SAME", dimension_numbers=DN)


UPSAMPLE_CASES = [((2, 5, 7, 3), 4), ((3, 8, 8, 16), 16), ((2, 16, 16, 64), 96)]


@pytest.mark.parametrize("impl", ["matmul", "xla"])
@pytest.mark.parametrize("case", UPSAMPLE_CASES, ids=[str(c) for c in UPSAMPLE_CASES])
def test_upsample_conv_matches_upsample_then_conv(case, impl):
    """Sub-pixel form (and the literal one) vs nearest 2x upsampling + lax conv: values, grads."""
    shape, cout = case
    kx, kk, kb, kg = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(kx, shape)
    k = jax.random.normal(kk, (3, 3, shape[-1], cout)) / np.sqrt(9 * shape[-1])
    b = jax.random.normal(kb, (cout,))
    g = jax.random.normal(kg, (shape[0], 2 * shape[1], 2 * shape[2], cout))
    fn = lambda x, k: upsample2x_conv3x3(x, k, impl=impl)  # noqa: E731
    _assert_same_values_and_grads(_upsample_then_conv, fn, x, k, b, g)


def test_upsample_conv_does_fewer_flops():
    """The sub-pixel form costs 16/36 of the direct multiply-adds (XLA's cost analysis)."""
    x = jnp.ones((4, 16, 16, 32))
    k = jnp.ones((3, 3, 32, 32))

    def flops(f):
        cost = jax.jit(f).lower(x, k).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])

    direct = flops(_upsample_then_conv)
    sub = flops(lambda x, k: upsample2x_conv3x3(x, k, impl="matmul"))
    # 16/36 = 0.44 of the products, plus the (H+1)(W+1)/(HW) border of the fused 2x2 conv.
    assert sub < 0.55 * direct, (sub, direct)


def test_upsample_conv_module_is_nn_conv_on_the_upsampled_input():
    """Same parameter names / shapes / initialisers as nn.Conv((3, 3)); same function."""
    x = jax.random.normal(jax.random.key(8), (2, 6, 6, 8))
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    ours = UpsampleConv(12, conv_impl="matmul")
    theirs = nn.Conv(12, (3, 3), padding="SAME")
    p_ours = ours.init(jax.random.key(0), x)
    p_theirs = theirs.init(jax.random.key(0), up)
    assert jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_theirs)):
        np.testing.assert_array_equal(a, b)
    p = jax.tree.map(lambda v: v + 0.1, p_theirs)  # non-zero bias
    np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, up), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3,3,C,C_out"):
        upsample2x_conv3x3(x, jnp.ones((2, 2, 8, 4)))


def test_upsample_conv_forward_mode_under_compile_options():
    """Under jaxdiff's compile options the sub-pixel layer is a custom_jvp: jax.jvp / jacfwd work
    and equal the direct form's; its reverse mode equals the custom_vjp form's (same four
    convolutions' gradients)."""
    kx, kk, kg = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 5, 6, 8))
    k = jax.random.normal(kk, (3, 3, 8, 4)) / np.sqrt(72)
    g = jax.random.normal(kg, (2, 10, 12, 4))
    dx, dk = jnp.ones_like(x), 0.1 * jnp.ones_like(k)
    auto = lambda x, k: upsample2x_conv3x3(x, k, impl="auto")  # noqa: E731
    y, t = compile_options.jit(lambda *a: jax.jvp(auto, a[:2], a[2:]))(x, k, dx, dk)
    y_ref, t_ref = jax.jit(lambda *a: jax.jvp(_upsample_then_conv, a[:2], a[2:]))(x, k, dx, dk)
    assert _rel(y_ref, y) < 1e-5 and _rel(t_ref, t) < 1e-5
    jac = compile_options.jit(jax.jacfwd(lambda x: auto(x, k).sum((1, 2, 3))))(x)
    jac_ref = jax.jacfwd(lambda x: _upsample_then_conv(x, k).sum((1, 2, 3)))(x)
    assert _rel(jac_ref, jac) < 1e-5
    vjp_new = compile_options.jit(lambda x, k, g: jax.vjp(auto, x, k)[1](g))(x, k, g)
    vjp_ref = jax.jit(lambda x, k, g: jax.vjp(_upsample_then_conv, x, k)[1](g))(x, k, g)
    for a, b in zip(vjp_ref, vjp_new):
        assert _rel(a, b) < 1e-5


def test_unet_forward_mode_under_compile_options():
    """jax.jvp through a two-level UNet (sub-pixel upsampling, blocked Dense layers) with the
    default conv_impl, compiled by jaxdiff's jit, equals the conv_impl="xla" network's."""
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))  # 64x64: the Dense layers see 8,192 rows
    t = jnp.array([10.0, 500.0])
    kw = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), dropout=0.0, norm_groups=8)
    auto, xla = UNet(**kw), UNet(**kw, conv_impl="xla")
    p = jax.jit(auto.init)(jax.random.key(1), x[:1], t[:1])["params"]
    p = jax.tree.map(lambda a: a + 0.01, p)  # no zero-initialised layer
    dp = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), p)
    run = lambda m: lambda p, x: m.apply({"params": p}, x, t)  # noqa: E731
    y, tan = compile_options.jit(lambda p, x, dp: jax.jvp(run(auto), (p, x), (dp, x)))(p, x, dp)
    y_ref, tan_ref = jax.jit(lambda p, x, dp: jax.jvp(run(xla), (p, x), (dp, x)))(p, x, dp)
    assert _rel(y_ref, y) < 1e-5 and _rel(tan_ref, tan) < 1e-5
