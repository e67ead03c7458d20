"""Tests of jaxdiff.nets.build (config -> module)."""

import jax
import jax.numpy as jnp
import pytest

from jaxdiff.nets import DiT, MLP, UNet, build, count_params


def test_build_unet_converts_lists_and_dtype():
    m = build({"name": "unet", "ch": 32, "ch_mult": [1, 2], "attn_resolutions": [4],
               "num_res_blocks": 1, "dtype": "bfloat16", "num_classes": 10})
    assert isinstance(m, UNet)
    assert m.ch_mult == (1, 2) and m.attn_resolutions == (4,)
    assert m.dtype == jnp.bfloat16 and m.param_dtype == jnp.float32 and m.num_classes == 10
    assert m.dropout == 0.1  # untouched default
    out = jax.eval_shape(m.init_with_output, jax.random.key(0), jnp.zeros((2, 8, 8, 1)),
                         jnp.zeros((2,)))[0]
    assert out.shape == (2, 8, 8, 1) and out.dtype == jnp.float32


def test_build_default_unet_is_ddpm():
    m = build({"name": "UNet"})
    assert m == UNet()
    p = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,)))
    assert count_params(p) == 35_746_307


def test_build_dit_variant_with_overrides():
    m = build({"name": "dit", "variant": "S/2", "input_size": 8, "in_channels": 1,
               "num_classes": 10, "depth": 3, "dtype": "float32"})
    assert isinstance(m, DiT)
    assert (m.hidden_size, m.num_heads, m.patch_size) == (384, 6, 2)  # from the preset
    assert (m.depth, m.input_size, m.in_channels, m.num_classes) == (3, 8, 1, 10)  # overrides
    assert m.dtype == jnp.float32
    m = build({"name": "dit", "variant": "XL/2"})
    assert (m.hidden_size, m.depth, m.num_heads) == (1152, 28, 16)
    m = build({"name": "dit", "hidden_size": 64, "depth": 1, "num_heads": 2})  # no variant
    assert (m.hidden_size, m.patch_size, m.num_classes) == (64, 2, 1000)


def test_build_mlp_and_config_dict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"name": "mlp", "hidden": 64, "depth": 2, "out_dim": 2})
    m = build(cfg)
    assert isinstance(m, MLP) and (m.hidden, m.depth, m.out_dim) == (64, 2, 2)
    assert cfg.name == "mlp" and "name" in cfg  # the caller's config is not mutated
    cfg = {"name": "mlp", "hidden": 16}
    build(cfg)
    assert cfg == {"name": "mlp", "hidden": 16}


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown net name 'transformer'") as e:
        build({"name": "transformer"})
    for valid in ("unet", "dit", "mlp"):
        assert valid in str(e.value)
    with pytest.raises(ValueError, match="name"):
        build({"ch": 32})


def test_unknown_field_is_named_with_valid_fields():
    with pytest.raises(ValueError, match="channels") as e:
        build({"name": "unet", "channels": 64})
    msg = str(e.value)
    assert "'channels'" in msg and "ch_mult" in msg and "attn_resolutions" in msg
    assert "'parent'" not in msg
    with pytest.raises(ValueError, match="hidden_dim") as e:
        build({"name": "mlp", "hidden_dim": 8})
    assert "hidden" in str(e.value) and "depth" in str(e.value)


def test_bad_variant_and_dtype():
    with pytest.raises(ValueError, match="XL/2"):
        build({"name": "dit", "variant": "XXL/2"})
    with pytest.raises(ValueError, match="variant"):
        build({"name": "unet", "variant": "S/2"})
    with pytest.raises(ValueError, match="bfloat16"):
        build({"name": "mlp", "dtype": "float8"})
