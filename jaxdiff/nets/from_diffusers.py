"""Weights of diffusers models in jaxdiff's networks: ``UNet2DModel`` -> :class:`~jaxdiff.nets.UNet`
(below), ``DiTTransformer2DModel`` -> :class:`~jaxdiff.nets.DiT` (:func:`load_dit`) and
``AutoencoderKL`` -> :class:`~jaxdiff.nets.vae.AutoencoderKL` (:func:`load_vae`).

diffusers' ``UNet2DModel`` with plain / attention down and up blocks *is* the DDPM U-Net of Ho
et al. 2020 (the published DDPM checkpoints ``google/ddpm-cifar10-32``, ``-celebahq-256``,
``-church-256``, ``-bedroom-256``, ``-cat-256`` are ports of the TF reference into it), so its
weights load into jaxdiff's UNet by renaming and transposing:

* :func:`unet_fields` -- the UNet constructor fields of a ``UNet2DModel`` ``config.json``
  (raises ``ValueError`` naming each setting jaxdiff's UNet does not have);
* :func:`unet_params` -- the Flax params from its ``state_dict`` (numpy arrays by diffusers'
  names; the old attention names ``query / key / value / proj_attn`` are accepted too);
* :func:`load_unet` -- both from a model folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``), without PyTorch.

Nothing is downloaded: the folder is a local copy. Weights are read from ``.safetensors``
(numpy, no PyTorch needed) or, if only ``diffusion_pytorch_model.bin`` is there, with
``torch.load(weights_only=True)`` (never unpickling code). The output equals diffusers' forward
pass to float32 rounding (``tests/nets/test_from_diffusers.py``, ``tests/nets/test_vae.py``;
the DiT with two documented exceptions, see :func:`dit_fields`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from .layers import group_norm_groups

__all__ = ["UNET2D_DEFAULTS", "unet_fields", "unet_params", "image_shape", "load_unet", "load_state_dict",
           "DIT_DEFAULTS", "dit_fields", "dit_params", "load_dit",
           "AUTOENCODER_KL_DEFAULTS", "vae_fields", "vae_params", "load_vae"]

# ``UNet2DModel.__init__`` defaults (diffusers 0.42): a config.json written by an older diffusers
# omits the keys added since, and diffusers fills them in with these.
UNET2D_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D",
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type="conv", upsample_type="conv", dropout=0.0,
    act_fn="silu", attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift="default", add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None,
)

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ValueError(f"expected a diffusers UNet2DModel config, got _class_name={cls!r}")
    return {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}


def unet_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """jaxdiff ``UNet`` fields (plus ``"name": "unet"``) equal to a ``UNet2DModel`` config.

    The architecture must be the DDPM one: ``DownBlock2D`` / ``AttnDownBlock2D`` blocks mirrored
    by ``UpBlock2D`` / ``AttnUpBlock2D``, conv resampling, SiLU, positional time embedding,
    ``UNetMidBlock2D`` with attention, a square ``sample_size`` (attention is placed by
    resolution in jaxdiff), and GroupNorm with ``norm_num_groups`` groups at every width.
    Anything else raises ``ValueError`` listing every unsupported setting.
    """
    c = _with_defaults(config)
    bad = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            bad.append(msg)

    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    chans = [int(v) for v in c["block_out_channels"]]
    need(all(b in _DOWN for b in down), f"down_block_types {down}: only {sorted(_DOWN)}")
    need(all(b in _UP for b in up), f"up_block_types {up}: only {sorted(_UP)}")
    need(len(down) == len(up) == len(chans),
         f"{len(down)} down blocks, {len(up)} up blocks, {len(chans)} block_out_channels")
    if not bad:
        need([_DOWN[b] for b in down] == [_UP[b] for b in reversed(up)],
             f"attention in down blocks {down} must mirror the up blocks {up}")
    need(all(ch % chans[0] == 0 for ch in chans),
         f"block_out_channels {chans}: each must be a multiple of the first")
    size = c["sample_size"]
    if isinstance(size, (list, tuple)):
        need(len(size) == 2 and size[0] == size[1], f"sample_size {size}: only square images")
        size = size[0]
    need(size is not None, "sample_size is not set (jaxdiff places attention by resolution)")
    for key, want in (("time_embedding_type", "positional"), ("mid_block_type", "UNetMidBlock2D"),
                      ("downsample_type", "conv"), ("upsample_type", "conv"),
                      ("resnet_time_scale_shift", "default"), ("add_attention", True),
                      ("center_input_sample", False), ("class_embed_type", None)):
        need(c[key] == want, f"{key}={c[key]!r} (only {want!r})")
    need(c["act_fn"] in ("silu", "swish"), f"act_fn={c['act_fn']!r} (only 'silu')")
    need(float(c["mid_block_scale_factor"]) == 1.0,
         f"mid_block_scale_factor={c['mid_block_scale_factor']} (only 1)")
    need(c["time_embedding_dim"] in (None, 4 * chans[0]),
         f"time_embedding_dim={c['time_embedding_dim']} (only 4 * block_out_channels[0])")
    need(int(c["downsample_padding"]) in (0, 1), f"downsample_padding={c['downsample_padding']} (only 0 or 1)")
    groups = c["norm_num_groups"]
    need(isinstance(groups, int) and groups > 0, f"norm_num_groups={groups!r} (a positive number of groups)")
    need(c["attn_norm_num_groups"] in (None, groups),
         f"attn_norm_num_groups={c['attn_norm_num_groups']} differs from norm_num_groups={groups}")
    head_dim = c["attention_head_dim"]
    if head_dim is not None and all(b in _DOWN for b in down):
        # only the widths that have attention: the attention levels and the middle block
        attn_widths = sorted({ch for ch, b in zip(chans, down) if _DOWN[b]} | {chans[-1]})
        need(all(ch % int(head_dim) == 0 for ch in attn_widths),
             f"attention_head_dim={head_dim} does not divide the attention widths {attn_widths}")
    if bad:
        raise ValueError("this UNet2DModel has settings jaxdiff's UNet does not:\n  " + "\n  ".join(bad))

    n = len(chans)
    widths = _normalised_widths(chans, int(c["layers_per_block"]))
    odd = sorted(w for w in widths if group_norm_groups(w, groups) != groups)
    if odd:
        raise ValueError(f"GroupNorm over {odd} channels: jaxdiff's UNet would use "
                         f"{[group_norm_groups(w, groups) for w in odd]} groups, the UNet2DModel "
                         f"{groups} (jaxdiff keeps >= 4 channels per group)")
    fields = dict(
        name="unet",
        ch=chans[0],
        ch_mult=tuple(ch // chans[0] for ch in chans),
        num_res_blocks=int(c["layers_per_block"]),
        attn_resolutions=tuple(int(size) // 2**i for i in range(n) if _DOWN[down[i]]),
        dropout=float(c["dropout"]),
        num_classes=int(c["num_class_embeds"] or 0),
        num_heads=1,
        head_dim=None if head_dim is None else int(head_dim),
        # None: as many as the input, jaxdiff's default (so that a config leaving it unset is the same net)
        out_channels=None if int(c["out_channels"]) == int(c["in_channels"]) else int(c["out_channels"]),
        norm_groups=groups,
        norm_eps=float(c["norm_eps"]),
        downsample_padding="same" if int(c["downsample_padding"]) == 0 else "symmetric",
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
        freq_shift=float(c["freq_shift"]),
    )
    return fields


def _normalised_widths(chans: list[int], layers: int) -> set[int]:
    """Channel counts GroupNorm sees in the DDPM U-Net with these level widths."""
    widths, skips, h = set(), [chans[0]], chans[0]
    for i, ch in enumerate(chans):
        for _ in range(layers):
            widths.add(h)
            h = ch
            widths.add(h)
            skips.append(h)
        if i != len(chans) - 1:
            skips.append(h)
    for ch in reversed(chans):
        for _ in range(layers + 1):
            widths.add(h + skips.pop())
            h = ch
            widths.add(h)
    return widths


def _module_map(fields: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """jaxdiff module name -> (diffusers module prefix, kind)."""
    n, layers = len(fields["ch_mult"]), int(fields["num_res_blocks"])
    out = {"conv_in": ("conv_in", "conv"), "conv_out": ("conv_out", "conv"),
           "norm_out": ("conv_norm_out", "norm"), "temb/dense0": ("time_embedding.linear_1", "dense"),
           "temb/dense1": ("time_embedding.linear_2", "dense"),
           "mid_block_1": ("mid_block.resnets.0", "resnet"), "mid_attn_1": ("mid_block.attentions.0", "attn"),
           "mid_block_2": ("mid_block.resnets.1", "resnet")}
    if fields.get("num_classes"):
        out["label_emb/embedding_table"] = ("class_embedding", "embed")
    for i in range(n):
        for j in range(layers):
            out[f"down_{i}_block_{j}"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
            out[f"down_{i}_attn_{j}"] = (f"down_blocks.{i}.attentions.{j}", "attn")
        out[f"down_{i}_downsample"] = (f"down_blocks.{i}.downsamplers.0.conv", "conv")
        k = n - 1 - i
        for j in range(layers + 1):
            out[f"up_{i}_block_{j}"] = (f"up_blocks.{k}.resnets.{j}", "resnet")
            out[f"up_{i}_attn_{j}"] = (f"up_blocks.{k}.attentions.{j}", "attn")
        out[f"up_{i}_upsample"] = (f"up_blocks.{k}.upsamplers.0.conv", "conv")
    return out


# Inside a block: jaxdiff submodule -> diffusers submodule (alternatives: old attention names).
_INNER = {
    "resnet": {"norm1/norm": ("norm1",), "conv1": ("conv1",), "temb_proj": ("time_emb_proj",),
               "norm2/norm": ("norm2",), "conv2": ("conv2",), "nin_shortcut": ("conv_shortcut",)},
    "attn": {"norm/norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
             "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn")},
    "norm": {"norm": ("",)},
    "conv": {"": ("",)},
    "dense": {"": ("",)},
    "embed": {"": ("",)},
}
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def _convert_leaf(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    v = np.asarray(value, np.float32)
    if name == "kernel" and v.ndim == 4 and len(target_shape) == 4:
        v = v.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif name == "kernel" and len(target_shape) == 2:
        v = v.reshape(v.shape[0], -1).T  # Linear (O, I) or 1x1 conv (O, I, 1, 1) -> (I, O)
    if name == "embedding" and v.shape[0] + 1 == target_shape[0]:
        # diffusers has no null class: jaxdiff's extra row (label num_classes) is set to zeros,
        # i.e. the time embedding alone -- a placeholder the imported model was never trained on.
        v = np.concatenate([v, np.zeros((1,) + v.shape[1:], v.dtype)])
    if v.shape != tuple(target_shape):
        raise ValueError(f"shape {v.shape} does not fit jaxdiff's {tuple(target_shape)}")
    return v


def unet_params(state_dict: Mapping[str, Any], fields: Mapping[str, Any], image_size: int) -> dict:
    """Flax params of ``UNet(**fields)`` from a ``UNet2DModel`` state dict (name -> array).

    ``image_size``: the config's ``sample_size`` (which resolutions have attention depends on it).

    Every array of the state dict must be used and every parameter found; otherwise a
    ``ValueError`` lists the missing and the unused names. The null-class row that jaxdiff's
    label table adds for classifier-free guidance is zeros.
    """
    import jax
    import jax.numpy as jnp

    from . import build

    kwargs = {k: v for k, v in fields.items() if k != "name"}
    model = build({"name": "unet", **kwargs})
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if "conv_in.weight" not in sd:
        raise ValueError("the state dict has no conv_in.weight: not a UNet2DModel state dict")
    x = jnp.zeros((1, image_size, image_size, sd["conv_in.weight"].shape[1]))
    y = jnp.zeros((1,), jnp.int32) if kwargs.get("num_classes") else None
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, jnp.zeros((1,)), y))["params"]
    return _map_state_dict(shapes, _module_map(fields), sd, f"UNet({_kwargs_str(kwargs)})")


def _kwargs_str(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _map_state_dict(shapes, modules: Mapping[str, tuple[str, str]], sd: dict, what: str) -> dict:
    """The params tree of ``shapes`` filled from the state dict ``sd``: each jaxdiff module (the
    longest prefix of a param path in ``modules``) is the diffusers module ``modules`` names,
    its submodules and leaves renamed by ``_INNER`` / ``_LEAF`` and converted by
    :func:`_convert_leaf`. Raises ValueError listing missing, unused and misshapen arrays."""
    import jax

    used, missing, errors = set(), [], []

    def fetch(path: tuple[str, ...], shape):
        leaf = path[-1]
        for cut in range(len(path) - 1, 0, -1):  # longest jaxdiff module prefix we know
            mod = "/".join(path[:cut])
            if mod in modules:
                break
        else:
            missing.append("/".join(path))
            return None
        prefix, kind = modules[mod]
        inner = "/".join(path[cut:-1])
        for alt in _INNER[kind].get(inner, ()):
            key = ".".join(p for p in (prefix, alt, _LEAF[leaf]) if p)
            if key in sd:
                used.add(key)
                try:
                    return _convert_leaf(leaf, sd[key], shape)
                except ValueError as e:
                    errors.append(f"{key} -> {'/'.join(path)}: {e}")
                    return None
        missing.append(f"{'/'.join(path)} (diffusers {prefix}.{'|'.join(_INNER[kind].get(inner, ('?',)))})")
        return None

    params = jax.tree_util.tree_map_with_path(
        lambda p, s: fetch(tuple(str(getattr(k, "key", k)) for k in p), s.shape), shapes)
    unused = sorted(set(sd) - used)
    if missing or unused or errors:
        lines = [f"the state dict does not fit {what}:"]
        for kind, items in (("missing", missing), ("unused", unused), ("wrong shape", errors)):
            if items:
                lines.append(f"{len(items)} {kind}: " + ", ".join(items[:12]) + (" ..." if len(items) > 12 else ""))
        raise ValueError("\n".join(lines))
    return params


# ------------------------------------------------------------------------------------------------
# DiTTransformer2DModel
# ------------------------------------------------------------------------------------------------

DIT_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None, num_layers=28,
    dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
    norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-5,
)


def dit_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    """jaxdiff ``DiT`` fields (plus ``"name": "dit"``) of a diffusers ``DiTTransformer2DModel``
    config (the layout of ``facebook/DiT-XL-2-256``'s ``transformer/``).

    jaxdiff's DiT is the original (``facebookresearch/DiT``) network, which diffusers' port
    deviates from in two small ways: its timestep embedding uses ``downscale_freq_shift=1``
    (frequencies ``exp(-ln(1e4) i / 127)`` instead of ``/ 128``) and the LayerNorm before each MLP
    has ``eps=norm_eps`` (1e-5) instead of 1e-6. Imported weights run here as the original
    network they were trained in (``tests/nets/test_from_diffusers.py`` compares with diffusers
    set to the original's two values, and measures the deviation)."""
    cls = config.get("_class_name", "DiTTransformer2DModel")
    if cls not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"expected a diffusers DiTTransformer2DModel config, got _class_name={cls!r}")
    c = {**DIT_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    cin = int(c["in_channels"])
    out = int(c["out_channels"] or cin)
    bad = []
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                      ("attention_bias", True), ("norm_elementwise_affine", False)):
        if c[key] != want:
            bad.append(f"{key}={c[key]!r} (only {want!r})")
    if out not in (cin, 2 * cin):
        bad.append(f"out_channels={out}: only in_channels or 2 * in_channels (learned sigma)")
    if not c["num_embeds_ada_norm"]:
        bad.append("num_embeds_ada_norm is not set (jaxdiff's DiT is class-conditional here)")
    if c["patch_size"] is None or c["sample_size"] is None:
        bad.append(f"patch_size={c['patch_size']!r}, sample_size={c['sample_size']!r}: a patched, sized model only")
    for key in ("cross_attention_dim", "num_vector_embeds", "caption_channels"):  # Transformer2DModel's
        if c.get(key) is not None:
            bad.append(f"{key}={c[key]!r} (only None: no text conditioning, continuous inputs)")
    if bad:
        raise ValueError("this DiTTransformer2DModel has settings jaxdiff's DiT does not:\n  " + "\n  ".join(bad))
    heads = int(c["num_attention_heads"])
    return dict(name="dit", input_size=int(c["sample_size"]), patch_size=int(c["patch_size"]), in_channels=cin,
                hidden_size=heads * int(c["attention_head_dim"]), depth=int(c["num_layers"]), num_heads=heads,
                mlp_ratio=4.0, num_classes=int(c["num_embeds_ada_norm"]), learn_sigma=out == 2 * cin)


def dit_params(state_dict: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
    """Flax params of ``DiT(**fields)`` from a ``DiTTransformer2DModel`` state dict.

    diffusers keeps a copy of the timestep / label embedders in every block (all equal in the
    converted DiT checkpoints); jaxdiff's DiT has one, so the copies must be equal (else
    ValueError). q, k, v are fused into one ``qkv`` kernel ([q | k | v], as DiT's timm attention).
    """
    import jax
    import jax.numpy as jnp

    from . import build

    kwargs = {k: v for k, v in fields.items() if k != "name"}
    model = build({"name": "dit", **kwargs})
    n = int(kwargs["input_size"])
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, n, n, kwargs["in_channels"])),
                                               jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))["params"]
    sd = {k: np.asarray(v, np.float32) for k, v in state_dict.items()}
    used = set()

    def get(key):
        if key not in sd:
            raise ValueError(f"the state dict does not fit DiT({_kwargs_str(kwargs)}): no {key}")
        used.add(key)
        return sd[key]

    def dense(prefix):
        return {"kernel": get(prefix + ".weight").T, "bias": get(prefix + ".bias")}

    emb = "transformer_blocks.{}.norm1.emb."
    for i in range(1, int(kwargs["depth"])):  # the per-block copies of the conditioning embedders
        for name in ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
                     "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
                     "class_embedder.embedding_table.weight"):
            if not np.array_equal(get(emb.format(i) + name), get(emb.format(0) + name)):
                raise ValueError(f"block {i}'s {name} differs from block 0's: jaxdiff's DiT shares one "
                                 "timestep / label embedder (as the original DiT)")
    out = {"x_embedder": {"kernel": get("pos_embed.proj.weight").transpose(2, 3, 1, 0),
                          "bias": get("pos_embed.proj.bias")},
           "t_embedder": {"dense0": dense(emb.format(0) + "timestep_embedder.linear_1"),
                          "dense1": dense(emb.format(0) + "timestep_embedder.linear_2")},
           "y_embedder": {"embedding_table": {"embedding": get(emb.format(0) + "class_embedder.embedding_table.weight")}},
           "final_layer": {"adaLN_modulation": dense("proj_out_1"), "linear": dense("proj_out_2")}}
    for i in range(int(kwargs["depth"])):
        b = f"transformer_blocks.{i}."
        q, k, v = (dense(b + f"attn1.to_{x}") for x in "qkv")
        out[f"blocks_{i}"] = {
            "adaLN_modulation": dense(b + "norm1.linear"),
            "qkv": {"kernel": np.concatenate([q["kernel"], k["kernel"], v["kernel"]], axis=1),
                    "bias": np.concatenate([q["bias"], k["bias"], v["bias"]])},
            "proj": dense(b + "attn1.to_out.0"), "fc1": dense(b + "ff.net.0.proj"), "fc2": dense(b + "ff.net.2")}
    unused = sorted(set(sd) - used - {"pos_embed.pos_embed"})  # diffusers' fixed position table
    if unused:
        raise ValueError(f"the state dict does not fit DiT({_kwargs_str(kwargs)}): {len(unused)} unused: "
                         + ", ".join(unused[:12]))
    want = {jax.tree_util.keystr(k): s.shape for k, s in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    got = {jax.tree_util.keystr(k): a.shape for k, a in jax.tree_util.tree_flatten_with_path(out)[0]}
    if want != got:
        differ = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        raise ValueError(f"the state dict does not fit DiT({_kwargs_str(kwargs)}): "
                         + ", ".join(f"{k}: {got.get(k)} vs {want.get(k)}" for k in differ[:12]))
    return out


def load_dit(model_dir: str) -> tuple[dict[str, Any], dict]:
    """``(fields, params)`` of the ``DiTTransformer2DModel`` saved in ``model_dir``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir} (expected a diffusers DiTTransformer2DModel folder)")
    with open(path) as f:
        fields = dit_fields(json.load(f))
    return fields, dit_params(load_state_dict(model_dir), fields)


# ------------------------------------------------------------------------------------------------
# AutoencoderKL (the latent-diffusion VAE)
# ------------------------------------------------------------------------------------------------

AUTOENCODER_KL_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215, shift_factor=None,
    latents_mean=None, latents_std=None, force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True,
)


def vae_fields(config: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
    """``(AutoencoderKL fields, scaling_factor)`` of a diffusers ``AutoencoderKL`` config.

    Raises ValueError naming each setting jaxdiff's :class:`~jaxdiff.nets.vae.AutoencoderKL`
    does not have (other block types, a shift factor or per-channel latent statistics, different
    in / out channels, only one of the quant convs, ...)."""
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"expected a diffusers AutoencoderKL config, got _class_name={cls!r}")
    c = {**AUTOENCODER_KL_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    chans = [int(v) for v in c["block_out_channels"]]
    bad = []
    if any(b != "DownEncoderBlock2D" for b in c["down_block_types"]) or len(c["down_block_types"]) != len(chans):
        bad.append(f"down_block_types {list(c['down_block_types'])}: only DownEncoderBlock2D, one per width")
    if any(b != "UpDecoderBlock2D" for b in c["up_block_types"]) or len(c["up_block_types"]) != len(chans):
        bad.append(f"up_block_types {list(c['up_block_types'])}: only UpDecoderBlock2D, one per width")
    if c["act_fn"] not in ("silu", "swish"):
        bad.append(f"act_fn={c['act_fn']!r} (only 'silu')")
    if int(c["out_channels"]) != int(c["in_channels"]):
        bad.append(f"out_channels={c['out_channels']} != in_channels={c['in_channels']}")
    if bool(c["use_quant_conv"]) != bool(c["use_post_quant_conv"]):
        bad.append("use_quant_conv and use_post_quant_conv differ")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if c[key] is not None:
            bad.append(f"{key}={c[key]!r} (only None: latents are scaled by scaling_factor alone)")
    groups = c["norm_num_groups"]
    if not (isinstance(groups, int) and groups > 0):
        bad.append(f"norm_num_groups={groups!r} (a positive number of groups)")
    elif any(group_norm_groups(ch, groups) != groups for ch in chans):
        bad.append(f"GroupNorm over {chans} channels in {groups} groups: jaxdiff keeps >= 4 channels per group")
    if bad:
        raise ValueError("this AutoencoderKL has settings jaxdiff's does not:\n  " + "\n  ".join(bad))
    fields = dict(in_channels=int(c["in_channels"]), latent_channels=int(c["latent_channels"]),
                  block_out_channels=tuple(chans), layers_per_block=int(c["layers_per_block"]),
                  norm_groups=groups, norm_eps=1e-6, mid_attention=bool(c["mid_block_add_attention"]),
                  quant_convs=bool(c["use_quant_conv"]))
    return fields, float(c["scaling_factor"])


def _vae_module_map(fields: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    n, layers = len(fields["block_out_channels"]), int(fields["layers_per_block"])
    out = {}
    for part in ("encoder", "decoder"):
        out.update({f"{part}/conv_in": (f"{part}.conv_in", "conv"), f"{part}/conv_out": (f"{part}.conv_out", "conv"),
                    f"{part}/norm_out": (f"{part}.conv_norm_out", "norm"),
                    f"{part}/mid/mid_block_1": (f"{part}.mid_block.resnets.0", "resnet"),
                    f"{part}/mid/mid_attn_1": (f"{part}.mid_block.attentions.0", "attn"),
                    f"{part}/mid/mid_block_2": (f"{part}.mid_block.resnets.1", "resnet")})
    out["encoder/quant_conv"] = ("quant_conv", "conv")
    out["decoder/post_quant_conv"] = ("post_quant_conv", "conv")
    for i in range(n):
        for j in range(layers):
            out[f"encoder/down_{i}_block_{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", "resnet")
        out[f"encoder/down_{i}_downsample"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", "conv")
        for j in range(layers + 1):
            out[f"decoder/up_{i}_block_{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", "resnet")
        out[f"decoder/up_{i}_upsample"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", "conv")
    return out


def vae_params(state_dict: Mapping[str, Any], fields: Mapping[str, Any]) -> dict:
    """Flax params (``{"encoder", "decoder"}``) of ``AutoencoderKL(**fields)`` from a diffusers
    ``AutoencoderKL`` state dict; every array used and every parameter found, as
    :func:`unet_params`."""
    import jax
    import jax.numpy as jnp

    from .vae import AutoencoderKL

    model = AutoencoderKL(**fields)
    size = 2 ** (len(fields["block_out_channels"]) - 1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, fields["in_channels"]))))
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    return _map_state_dict(shapes["params"], _vae_module_map(fields), sd, f"AutoencoderKL({_kwargs_str(fields)})")


def load_vae(model_dir: str) -> tuple[dict[str, Any], dict, float]:
    """``(fields, params, scaling_factor)`` of the diffusers ``AutoencoderKL`` saved in
    ``model_dir`` (``config.json`` and weights); ``jaxdiff.nets.vae.AutoencoderKL(**fields)``."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir} (expected a diffusers AutoencoderKL folder)")
    with open(path) as f:
        fields, scaling = vae_fields(json.load(f))
    return fields, vae_params(load_state_dict(model_dir), fields), scaling


def load_state_dict(model_dir: str) -> dict[str, np.ndarray]:
    """The arrays of ``model_dir/diffusion_pytorch_model.safetensors`` (numpy; no PyTorch), or of
    ``diffusion_pytorch_model.bin`` through ``torch.load(weights_only=True)``."""
    st = os.path.join(model_dir, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(st):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors needs the safetensors package (pip install safetensors)") from e
        return load_file(st)
    binary = os.path.join(model_dir, "diffusion_pytorch_model.bin")
    if os.path.isfile(binary):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{binary} is a PyTorch file: reading it needs torch, or convert it to "
                              ".safetensors") from e
        sd = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in sd.items()}
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors or .bin in {model_dir}")


def image_shape(config: Mapping[str, Any]) -> tuple[int, int, int]:
    """``(H, W, C)`` of the images a ``UNet2DModel`` config is for (``sample_size``, ``in_channels``)."""
    c = _with_defaults(config)
    size = c["sample_size"]
    h, w = (size, size) if not isinstance(size, (list, tuple)) else size
    return int(h), int(w), int(c["in_channels"])


def load_unet(model_dir: str) -> tuple[dict[str, Any], dict, tuple[int, int, int]]:
    """``(fields, params, (H, W, C))`` of the ``UNet2DModel`` saved in ``model_dir`` (its
    ``config.json`` and weights); build the network with ``jaxdiff.nets.build(fields)``.

    The network takes the diffusers timestep (``0 .. num_train_timesteps - 1``) as ``t``, as
    jaxdiff's ``discrete_vp`` process feeds it, and NHWC images instead of NCHW.
    """
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {model_dir} (expected a diffusers UNet2DModel folder)")
    with open(path) as f:
        config = json.load(f)
    fields = unet_fields(config)
    shape = image_shape(config)
    return fields, unet_params(load_state_dict(model_dir), fields, shape[0]), shape
