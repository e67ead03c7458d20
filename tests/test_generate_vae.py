"""``config.sample.vae``: sampling a latent model returns decoded images, ``decode(latents /
scaling_factor)`` by the configured diffusers ``AutoencoderKL``, as diffusers decodes them."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.config_base import base_config, check_config
from jaxdiff.generate import generate, make_sample_fn
from jaxdiff.modeling import build_model
from jaxdiff.nets.vae import posterior_sample
from tests.helpers import save_random_vae
from tests.nets.test_vae import SMALL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_latent_samples_are_decoded_as_diffusers_decodes_them(tmp_path):
    ref = save_random_vae(tmp_path / "vae", SMALL)

    c = base_config()
    c.data.image_size, c.data.channels = 4, 4  # 4x4x4 latents -> 16x16x3 images (SMALL: 3 levels)
    c.model = ml_collections.ConfigDict(dict(name="unet", ch=16, ch_mult=(1,), num_res_blocks=1,
                                             attn_resolutions=(), dropout=0.0))
    model = build_model(c)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)))["params"]
    params = jax.tree.map(lambda p: p + 0.05, params)  # away from the zero-initialised output conv
    key = jax.random.PRNGKey(3)
    latents = np.asarray(make_sample_fn(c, model, "ddim", 3, 2)(params, key, None))

    c.sample.vae = str(tmp_path / "vae")
    fn = make_sample_fn(c, model, "ddim", 3, 2)
    images = np.asarray(fn(params, key, None))
    assert images.shape == (2, 16, 16, 3)
    assert "stablehlo" in fn.lower(params, key, None).as_text()  # lowers like the plain jitted sampler
    with torch.no_grad():
        z = torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()) / SMALL["scaling_factor"]
        want = ref.decode(z).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(images - want).max() / np.abs(want).max() < 1e-5
    # generate (what `jaxdiff sample` and the trainer's end-of-run grid use): batch b's key is fold_in(key, b)
    first = np.asarray(fn(params, jax.random.fold_in(key, 0), None))
    np.testing.assert_array_equal(generate(c, model, params, 2, key, sampler="ddim", num_steps=3, batch_size=2,
                                           progress=False), first)
    assert first.shape == (2, 16, 16, 3)


def test_sample_vae_is_checked_against_the_data(tmp_path):
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**dict(SMALL, latent_channels=3)).save_pretrained(str(tmp_path / "vae"))
    c = base_config()
    c.data.image_size, c.data.channels = 4, 4
    c.model = ml_collections.ConfigDict(dict(name="unet", ch=16, ch_mult=(1,), num_res_blocks=1, attn_resolutions=()))
    c.sample.vae = str(tmp_path / "vae")
    with pytest.raises(ValueError, match=r"config.sample.vae=.* decodes 3-channel latents but .*channels=4"):
        check_config(c)
    c.sample.vae = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="config.sample.vae=.*no config.json"):
        make_sample_fn(c, build_model(c), "ddim", 2, 2)


def test_posterior_sample_has_the_posterior_moments():
    mean = jnp.full((200_000,), 0.3)
    logvar = jnp.full((200_000,), np.log(0.25))
    z = np.asarray(posterior_sample(jax.random.PRNGKey(0), mean, logvar))
    assert abs(z.mean() - 0.3) < 0.005 and abs(z.std() - 0.5) < 0.005


def test_chunked_decoding_equals_whole_batch_and_needs_less_memory(tmp_path):
    """``sample.decode_batch``: the same images as decoding the whole batch at once, from a
    compiled program whose temporary buffers are smaller."""
    save_random_vae(tmp_path / "vae", SMALL)
    c = base_config()
    c.data.image_size, c.data.channels = 4, 4
    c.model = ml_collections.ConfigDict(dict(name="unet", ch=16, ch_mult=(1,), num_res_blocks=1,
                                             attn_resolutions=(), dropout=0.0))
    c.sample.vae = str(tmp_path / "vae")
    model = build_model(c)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)))["params"]
    params = jax.tree.map(lambda p: p + 0.05, params)
    key = jax.random.PRNGKey(5)
    whole = make_sample_fn(c, model, "ddim", 2, 8)
    want = np.asarray(whole(params, key, None))
    temp = {}
    for decode_batch in (3, 1):  # 3: chunks of 3, 3, 2 rows padded to 3; 1: one image at a time
        fn = make_sample_fn(c, model, "ddim", 2, 8, decode_batch=decode_batch)
        got = np.asarray(fn(params, key, None))
        assert got.shape == want.shape == (8, 16, 16, 3)
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, decode_batch
        temp[decode_batch] = fn.lower(params, key, None).compile().memory_analysis().temp_size_in_bytes
    temp[0] = whole.lower(params, key, None).compile().memory_analysis().temp_size_in_bytes
    assert temp[1] < temp[3] < temp[0], temp
    c.sample.decode_batch = 1  # the config's setting is the default
    np.testing.assert_array_equal(np.asarray(make_sample_fn(c, model, "ddim", 2, 8)(params, key, None)),
                                  np.asarray(make_sample_fn(c, model, "ddim", 2, 8, decode_batch=1)(params, key, None)))
    with pytest.raises(ValueError, match="decode_batch=-1"):
        make_sample_fn(c, model, "ddim", 2, 8, decode_batch=-1)


_FOUR_DEVICE_CHUNKS = r"""
import itertools
import jax, jax.numpy as jnp, numpy as np
from jaxdiff import parallel
from jaxdiff.generate import decode_in_chunks
assert jax.device_count() == 4
w = jax.random.normal(jax.random.key(1), (6, 10))
seen = []
def decode(z):  # row-wise and nonlinear; records the batch each call sees
    seen.append(z.shape[0])
    return jnp.tanh(z @ w)[:, None, :] * jnp.arange(3.0)[:, None]
# (batch, decode_batch per device, rows per decoder call): 3 rows per device in chunks of 1; 2 + 1 padded
# to 2 + 2; 4 per device in 2 + 2; at least all of a device's rows: one call
cases = ((12, 1, 4), (12, 2, 8), (16, 3, 8), (16, 2, 8), (12, 3, 12), (12, 0, 12), (12, 99, 12))
for (n, decode_batch, rows), mesh in itertools.product(cases, (parallel.make_mesh(), parallel.make_mesh(2, 2))):
    x = jax.device_put(jax.random.normal(jax.random.key(n + decode_batch), (n, 6)), parallel.batch_sharding(mesh))
    seen.clear()
    fn = jax.jit(lambda x: decode_in_chunks(decode, x, decode_batch, mesh), out_shardings=parallel.batch_sharding(mesh))
    got = fn(x)
    assert seen == [rows], (n, decode_batch, mesh.shape, seen)
    np.testing.assert_allclose(np.asarray(got), np.asarray(decode(x)), rtol=1e-6, atol=1e-6)
    hlo = fn.lower(x).compile().as_text()
    for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce"):
        assert op not in hlo, (n, decode_batch, op)
print("ok")
"""


def test_chunked_decoding_on_four_devices_keeps_each_device_on_its_own_latents():
    """Chunks take rows from every device's own block: equal results, at most ``decode_batch``
    rows per device per decoder call, and no collective in the compiled program."""
    from tests.helpers import run_python

    proc = run_python(["-c", _FOUR_DEVICE_CHUNKS], env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert proc.stdout.strip().endswith("ok")
