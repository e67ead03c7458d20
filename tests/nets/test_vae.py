"""The latent-diffusion KL autoencoder (``jaxdiff.nets.vae``) against diffusers' ``AutoencoderKL``
with the same random weights (loaded by ``jaxdiff.nets.from_diffusers.load_vae``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.nets.from_diffusers import load_vae, vae_fields
from jaxdiff.nets.vae import AutoencoderKL
from tests.helpers import save_random_vae

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors.numpy")

# The SD VAE's layout, narrowed: three widths, two residual blocks per level, attention in the middle.
SMALL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
             up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 32, 64), layers_per_block=2,
             latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.3)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    ref = save_random_vae(root, SMALL)
    fields, params, scaling = load_vae(str(root))
    return ref, AutoencoderKL(**fields), params, scaling


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_encode_and_decode_match_diffusers(vae):
    ref, model, params, scaling = vae
    assert scaling == 0.3
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(p.numel() for p in ref.parameters())
    x = np.random.default_rng(0).uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(nchw(x)).latent_dist
        want_mean, want_logvar = post.mean.numpy().transpose(0, 2, 3, 1), post.logvar.numpy().transpose(0, 2, 3, 1)
    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))(params, x)
    assert mean.shape == (2, 4, 4, 4)
    assert rel(np.asarray(mean), want_mean) < 1e-5 and rel(np.asarray(logvar), want_logvar) < 1e-5

    z = np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))(params, jnp.asarray(z))
    assert got.shape == (2, 16, 16, 3)
    assert rel(np.asarray(got), want) < 1e-5


def test_unsupported_vae_configs_are_named():
    with pytest.raises(ValueError) as e:
        vae_fields(dict(SMALL, up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
                        shift_factor=0.1159, use_post_quant_conv=False))
    msg = str(e.value)
    for part in ("AttnUpDecoderBlock2D", "shift_factor=0.1159", "use_quant_conv and use_post_quant_conv differ"):
        assert part in msg
    with pytest.raises(ValueError, match="AutoencoderKL config"):
        vae_fields({"_class_name": "AutoencoderTiny"})
