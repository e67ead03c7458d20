"""diffusers ``UNet2DModel`` weights in jaxdiff's UNet (``jaxdiff.nets.from_diffusers``).

The reference is diffusers itself: a randomly initialised ``UNet2DModel`` saved with
``save_pretrained`` (safetensors), loaded by jaxdiff without PyTorch, and both forward passes
compared on the same inputs (NCHW there, NHWC here).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets import build
from jaxdiff.nets.from_diffusers import dit_fields, dit_params, load_dit, load_state_dict, load_unet, unet_fields, unet_params

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

# DDPM's layout (google/ddpm-cifar10-32's config, narrowed): TF SAME downsampling
# (downsample_padding=0), [sin, cos] embedding with freq_shift=1, eps 1e-6, one attention head,
# attention at the second level (8x8 of 16x16).
DDPM_LIKE = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                 block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                 attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                 norm_eps=1e-6)
# diffusers' own defaults where DDPM differs: symmetric downsampling padding, [cos, sin]
# embedding, eps 1e-5, 8-dim heads, three levels with attention at the first, 4 classes.
DEFAULTS_LIKE = dict(sample_size=8, in_channels=2, out_channels=4, layers_per_block=2,
                     block_out_channels=(16, 32, 32),
                     down_block_types=("AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D"), norm_num_groups=4,
                     num_class_embeds=4)


def save_random_unet(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # diffusers does not zero-initialise; perturb biases and norms too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    return model


def torch_forward(model, x_nhwc, t, y=None):
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                    torch.from_numpy(t), class_labels=None if y is None else torch.from_numpy(y)).sample
    return out.numpy().transpose(0, 2, 3, 1)


# 64-dim heads at the 64-wide attention level; the 32-wide level has no attention, so 64 needs
# not divide it (this was refused)
@pytest.mark.parametrize("config", [DDPM_LIKE, DEFAULTS_LIKE, dict(DDPM_LIKE, attention_head_dim=64)],
                         ids=["ddpm", "diffusers_defaults", "head_dim_of_the_attention_levels"])
def test_forward_matches_diffusers(tmp_path, config):
    ref = save_random_unet(tmp_path, config)
    fields, params, shape = load_unet(str(tmp_path))
    assert shape == (config["sample_size"], config["sample_size"], config["in_channels"])
    model = build(fields)
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    # jaxdiff's label table has one more row (the null class) than diffusers'
    extra = fields["ch"] * 4 if fields["num_classes"] else 0
    assert n_params == sum(p.numel() for p in ref.parameters()) + extra
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3,) + shape).astype(np.float32)
    t = np.array([0.0, 417.0, 999.0], np.float32)
    y = np.array([0, 3, 1], np.int64) if fields["num_classes"] else None
    want = torch_forward(ref, x, t, y)
    got = np.asarray(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(
        params, jnp.asarray(x), jnp.asarray(t), None if y is None else jnp.asarray(y, jnp.int32)))
    assert got.shape == want.shape
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 2e-5, err


def test_old_attention_names_and_bin_file(tmp_path):
    """Checkpoints from diffusers < 0.15 (the google/ddpm-* ones) name the attention layers
    query / key / value / proj_attn; a .bin file is read with torch.load(weights_only=True)."""
    ref = save_random_unet(tmp_path / "new", DDPM_LIKE)
    sd = {k: v for k, v in ref.state_dict().items()}
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, was in renames.items():
            k = k.replace(f".{new}.", f".{was}.")
        old[k] = v.clone()
    # weight and bias of 4 attention layers: one down, the middle one, two up (layers + 1)
    assert sum(".query." in k for k in old) == 8
    d = tmp_path / "old"
    d.mkdir()
    torch.save(old, str(d / "diffusion_pytorch_model.bin"))
    with open(tmp_path / "new" / "config.json") as f:
        (d / "config.json").write_text(f.read())
    _, p_new, _ = load_unet(str(tmp_path / "new"))
    fields, p_old, _ = load_unet(str(d))
    jax.tree.map(np.testing.assert_array_equal, p_new, p_old)


def test_state_dict_mismatch_names_missing_and_unused(tmp_path):
    save_random_unet(tmp_path, DDPM_LIKE)
    sd = load_state_dict(str(tmp_path))
    with open(tmp_path / "config.json") as f:
        fields = unet_fields(json.load(f))
    sd["extra.weight"] = np.zeros(3, np.float32)
    del sd["mid_block.attentions.0.to_q.bias"]
    with pytest.raises(ValueError, match=r"(?s)1 missing: mid_attn_1/q/bias.*1 unused: extra.weight"):
        unet_params(sd, fields, 16)
    sd = load_state_dict(str(tmp_path))
    sd["conv_in.weight"] = sd["conv_in.weight"][:16]
    with pytest.raises(ValueError, match="wrong shape: conv_in.weight"):
        unet_params(sd, fields, 16)


def test_unsupported_configs_are_named():
    with pytest.raises(ValueError) as e:
        unet_fields(dict(DDPM_LIKE, down_block_types=("DownBlock2D", "SkipDownBlock2D"),
                         time_embedding_type="fourier", act_fn="gelu"))
    msg = str(e.value)
    for part in ("SkipDownBlock2D", "time_embedding_type='fourier'", "act_fn='gelu'"):
        assert part in msg
    with pytest.raises(ValueError, match="must mirror"):
        unet_fields(dict(DDPM_LIKE, up_block_types=("UpBlock2D", "AttnUpBlock2D")))
    with pytest.raises(ValueError, match="sample_size is not set"):
        unet_fields(dict(DDPM_LIKE, sample_size=None))
    # 16 channels in 8 groups: jaxdiff's UNet keeps >= 4 channels per group (4 groups)
    with pytest.raises(ValueError, match=r"GroupNorm over \[16\] channels"):
        unet_fields(dict(DDPM_LIKE, block_out_channels=(16, 32)))
    with pytest.raises(ValueError, match="UNet2DModel config"):
        unet_fields({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError) as e:
        unet_fields(dict(DDPM_LIKE, attention_head_dim=24, norm_num_groups=None))
    assert "attention_head_dim=24 does not divide the attention widths [64]" in str(e.value)
    assert "norm_num_groups=None" in str(e.value)


def test_ddpm_cifar10_config_maps_to_the_ddpm_unet():
    """google/ddpm-cifar10-32's config.json (as published, written by diffusers 0.0.4) gives
    the fields of jaxdiff's default UNet, the DDPM CIFAR-10 model."""
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
              "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
              "center_input_sample": False,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
              "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
              "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
              "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
              "time_embedding_type": "positional",
              "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    fields = unet_fields(config)
    default = build({"name": "unet"})
    assert fields["out_channels"] is None  # 3 = in_channels: jaxdiff's default, the input's channels
    for k, v in fields.items():
        if k not in ("name", "dropout"):
            assert getattr(default, k) == v, k
    assert unet_fields(dict(config, act_fn="swish")) == fields  # diffusers' alias of silu


# ---- DiTTransformer2DModel -----------------------------------------------------------------------

DIT_SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=3)


def save_random_dit(path, config=DIT_SMALL, seed=0):
    """A random diffusers DiT whose per-block conditioning embedders are copies of block 0's
    (as in the converted DiT checkpoints)."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    model.save_pretrained(str(path), safe_serialization=True)
    return model


def test_dit_matches_diffusers_set_to_the_original_dit(tmp_path):
    ref = save_random_dit(tmp_path)
    fields, params = load_dit(str(tmp_path))
    assert fields["learn_sigma"] and fields["hidden_size"] == 32 and fields["num_classes"] == 3
    model = build(fields)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8, 8, 4)).astype(np.float32)
    t = np.array([0.0, 417.0, 999.0], np.float32)
    y = np.array([0, 2, 3])  # 3 = the null class, a row of both tables

    def theirs():
        with torch.no_grad():
            out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), timestep=torch.from_numpy(t),
                      class_labels=torch.from_numpy(y)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    got = np.asarray(jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(
        params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y, jnp.int32)))
    ported = theirs()
    # diffusers' port: timestep frequencies exp(-ln(1e4) i / 127) and eps 1e-5 before the MLP;
    # the original DiT (and jaxdiff): / 128 and 1e-6. Measured: 0.17 apart on this network.
    assert np.abs(got - ported).max() / np.abs(ported).max() > 1e-2
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
        block.norm3.eps = 1e-6
    want = theirs()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_dit_per_block_embedders_must_agree_and_settings_are_named(tmp_path):
    ref = save_random_dit(tmp_path)
    sd = load_state_dict(str(tmp_path))
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    sd[key] = sd[key] + 1.0
    with pytest.raises(ValueError, match="block 1's class_embedder.embedding_table.weight differs"):
        dit_params(sd, dit_fields(dict(ref.config)))
    with pytest.raises(ValueError) as e:
        dit_fields(dict(DIT_SMALL, norm_type="ada_norm_single", out_channels=6))
    assert "norm_type='ada_norm_single'" in str(e.value) and "out_channels=6" in str(e.value)
    with pytest.raises(ValueError) as e:
        dit_fields({"_class_name": "Transformer2DModel", "patch_size": None, "cross_attention_dim": 768})
    assert "patch_size=None" in str(e.value) and "cross_attention_dim=768" in str(e.value)
