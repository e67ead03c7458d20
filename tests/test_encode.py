"""``jaxdiff encode``: an ImageFolder -> a latent dataset whose stored posteriors equal diffusers'
``AutoencoderKL.encode`` of the ADM-cropped images and their mirror images; resuming after an
interruption writes the same files; training on the latents draws from the stored posterior."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdiff.data import LatentSource, make_source
from jaxdiff.data.images import ImageFolderImages, center_crop_arr
from jaxdiff.encode import encode_images, image_reader
from tests.helpers import save_random_vae
from tests.nets.test_vae import SMALL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 16  # SMALL has three levels: 16x16x3 images -> 4x4x4 latents
SHAPES = [(40, 24), (24, 40), (33, 17), (64, 64), (16, 16), (50, 31), (20, 20)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    ref = save_random_vae(root / "vae", SMALL)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SHAPES):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        # smooth colour gradients with a little noise, asymmetric so that the mirror image differs
        img = np.stack([200 * xx + 30 * i, 150 * yy + 60 * xx * yy, 255 * (1 - xx) * (i % 3 == 0)], -1)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        d = root / "images" / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        mode = "L" if i == 2 else "RGB"
        Image.fromarray(img).convert(mode).save(d / f"img_{i}.png")
    return root, ref


def _diffusers_posteriors(ref, images, scaling):
    """diffusers' posterior mean / std (times the scaling factor) of every image and its mirror."""
    pixels = np.stack([center_crop_arr(images.read(i)[0], SIZE) for i in range(len(images))])
    x = pixels.astype(np.float32) / 127.5 - 1.0
    out = []
    for view in (x, x[:, :, ::-1]):
        with torch.no_grad():
            dist = ref.encode(torch.from_numpy(np.ascontiguousarray(view.transpose(0, 3, 1, 2)))).latent_dist
        out.append((dist.mean.numpy().transpose(0, 2, 3, 1) * scaling, dist.std.numpy().transpose(0, 2, 3, 1) * scaling))
    mean = np.stack([out[0][0], out[1][0]], axis=1)
    std = np.stack([out[0][1], out[1][1]], axis=1)
    return mean, std


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def encoded(assets):
    root, ref = assets
    images = ImageFolderImages(str(root / "images"))
    summary = encode_images(images, str(root / "vae"), str(root / "latents"), image_size=SIZE, batch_size=3,
                            progress=False)
    return root, ref, images, summary


def test_stored_posteriors_equal_diffusers_encoder(encoded):
    root, ref, images, summary = encoded
    n = len(SHAPES)
    assert summary["num_images"] == n and summary["num_examples"] == 2 * n and summary["encoded_now"] == n
    assert summary["latent_shape"] == [4, 4, 4] and summary["views"] == ["image", "hflip"]
    d = root / "latents" / "train"
    mean, std, label = (np.load(d / f"{k}.npy") for k in ("mean", "std", "label"))
    want_mean, want_std = _diffusers_posteriors(ref, images, SMALL["scaling_factor"])
    assert mean.shape == (n, 2, 4, 4, 4) and mean.dtype == np.float32
    assert rel(mean, want_mean) < 1e-5 and rel(std, want_std) < 1e-5
    # the mirror image's latents are its own: not a copy, and not the mirrored latents either
    assert rel(mean[:, 1], mean[:, 0]) > 0.05 and rel(mean[:, 1], mean[:, 0, :, ::-1]) > 0.05
    np.testing.assert_array_equal(label, images.labels)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["num_done"] == n and meta["scaling_factor"] == SMALL["scaling_factor"]
    assert meta["settings"]["source"]["classes"] == ["class_0", "class_1", "class_2"]
    # the summary's moments are those of the un-mirrored scaled means
    assert abs(summary["latent_mean"] - float(want_mean[:, 0].mean())) < 1e-5
    assert abs(summary["latent_std"] - float(want_mean[:, 0].std())) < 1e-5


def test_latent_source_serves_both_views(encoded):
    root, _, images, _ = encoded
    n = len(SHAPES)
    src = make_source({"name": "latents", "latents_dir": str(root / "latents")}, "train")
    assert isinstance(src, LatentSource) and len(src) == 2 * n
    mean = np.load(root / "latents" / "train" / "mean.npy")
    std = np.load(root / "latents" / "train" / "std.npy")
    idx = np.array([0, n - 1, n, 2 * n - 1, -1])
    b = src[idx]
    np.testing.assert_array_equal(b["image"], mean[[0, n - 1, 0, n - 1, n - 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["image_std"], std[[0, n - 1, 0, n - 1, n - 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b["label"], images.labels[[0, n - 1, 0, n - 1, n - 1]])
    b2 = make_source({"name": "latents", "latents_dir": str(root / "latents"), "latent_posterior": "mean"},
                     "train")[idx.reshape(5, 1)]
    assert set(b2) == {"image", "label"} and b2["image"].shape == (5, 1, 4, 4, 4)
    with pytest.raises(IndexError):
        src[np.array([2 * n])]
    with pytest.raises(FileNotFoundError, match=r"no latent dataset split 'test'.*splits \['train'\]"):
        make_source({"name": "latents", "latents_dir": str(root / "latents")}, "test")


def test_interrupted_encode_resumes_to_the_same_files(encoded, monkeypatch):
    root, _, images, _ = encoded
    out = str(root / "resumed")
    import jaxdiff.data.latents as L

    real_commit, calls = L.LatentWriter.commit, []

    def failing_commit(self, num_done):
        real_commit(self, num_done)
        calls.append(num_done)
        if num_done == 4:
            raise KeyboardInterrupt  # killed right after the second commit

    monkeypatch.setattr(L.LatentWriter, "commit", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        encode_images(images, str(root / "vae"), out, image_size=SIZE, batch_size=2, commit_every=2, progress=False)
    monkeypatch.setattr(L.LatentWriter, "commit", real_commit)
    assert calls == [0, 4] and json.loads(open(os.path.join(out, "train", "meta.json")).read())["num_done"] == 4
    with pytest.raises(ValueError, match=r"incomplete: 4 of 7 images encoded.*again"):
        LatentSource(out)
    summary = encode_images(images, str(root / "vae"), out, image_size=SIZE, batch_size=2, progress=False)
    assert summary["resumed_from"] == 4 and summary["encoded_now"] == 3
    for k in ("mean", "std", "label"):
        np.testing.assert_array_equal(np.load(os.path.join(out, "train", f"{k}.npy")),
                                      np.load(root / "latents" / "train" / f"{k}.npy"))
    # complete: a third run encodes nothing; other settings on the same folder are refused
    assert encode_images(images, str(root / "vae"), out, image_size=SIZE, batch_size=2,
                         progress=False)["encoded_now"] == 0
    with pytest.raises(ValueError, match=r"other settings \(views:"):
        encode_images(images, str(root / "vae"), out, image_size=SIZE, flip=False, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(.*image_size"):
        encode_images(images, str(root / "vae"), out, image_size=2 * SIZE, progress=False)
    # one writer per split at a time
    from jaxdiff.data.latents import LatentWriter, read_meta

    meta = read_meta(out)
    first = LatentWriter(out, "train", meta["settings"], meta["num_images"], meta["views"], meta["latent_shape"],
                         meta["dtype"], meta["scaling_factor"])
    with pytest.raises(ValueError, match="another process is writing"):
        encode_images(images, str(root / "vae"), out, image_size=SIZE, batch_size=2, progress=False)
    first.close()


def test_float16_storage_limit_and_no_flip(encoded):
    root, _, images, _ = encoded
    out = str(root / "half")
    s = encode_images(images, str(root / "vae"), out, image_size=SIZE, batch_size=4, flip=False, dtype="float16",
                      limit=5, progress=False)
    assert s["num_images"] == 5 and s["num_examples"] == 5 and s["views"] == ["image"]
    mean = np.load(os.path.join(out, "train", "mean.npy"))
    full = np.load(root / "latents" / "train" / "mean.npy")
    assert mean.dtype == np.float16 and mean.shape == (5, 1, 4, 4, 4)
    assert np.load(os.path.join(out, "train", "std.npy")).dtype == np.float32  # stds stay float32
    assert np.abs(mean.astype(np.float32) - full[:5, :1]).max() <= 1e-3 * np.abs(full).max()
    assert len(LatentSource(out)) == 5


def test_encode_argument_errors(assets, tmp_path):
    root, _ = assets
    images = ImageFolderImages(str(root / "images"))
    # a dataset root with split folders is not a class tree
    (tmp_path / "imnet" / "train" / "n01").mkdir(parents=True)
    (tmp_path / "imnet" / "val" / "n01").mkdir(parents=True)
    for split in ("train", "val"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "imnet" / split / "n01" / "a.png")
    with pytest.raises(ValueError, match="looks like a dataset root with split folders"):
        encode_images(ImageFolderImages(str(tmp_path / "imnet")), str(root / "vae"), str(tmp_path / "x"),
                      image_size=SIZE, progress=False)
    # a corrupt file is named, and the batches before it stay committed
    bad = tmp_path / "bad"
    for i in range(5):
        (bad / "c").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(bad / "c" / f"{i}.png")
    (bad / "c" / "3.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError, match=r"cannot read image .*3\.png"):
        encode_images(ImageFolderImages(str(bad)), str(root / "vae"), str(tmp_path / "y"), image_size=SIZE,
                      batch_size=1, commit_every=100, progress=False)
    assert json.loads((tmp_path / "y" / "train" / "meta.json").read_text())["num_done"] == 3
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 4"):
        encode_images(images, str(root / "vae"), str(root / "x"), image_size=18, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        encode_images(images, str(root / "vae"), str(root / "x"), image_size=SIZE, dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="exactly one of --image_folder"):
        image_reader("", "")
    with pytest.raises(ValueError, match="exactly one of --image_folder"):
        image_reader(str(root / "images"), "mnist")


def test_training_step_draws_from_the_stored_posterior():
    from jaxdiff.train.step import latent_draw

    n = 400_000
    batch = {"image": jnp.full((n,), 0.3), "image_std": jnp.full((n,), 0.5), "label": jnp.zeros((n,), jnp.int32)}
    z = np.asarray(latent_draw(jax.random.PRNGKey(0), batch))
    assert abs(z.mean() - 0.3) < 0.003 and abs(z.std() - 0.5) < 0.003
    assert not np.array_equal(z, np.asarray(latent_draw(jax.random.PRNGKey(1), batch)))
    plain = {"image": jnp.arange(3.0), "label": jnp.zeros((3,), jnp.int32)}
    assert latent_draw(jax.random.PRNGKey(0), plain) is plain["image"]


def test_dit_trains_on_the_latents_and_samples_images(encoded, tmp_path):
    from jaxdiff.config_base import check_config
    from jaxdiff.train import train
    from tests.helpers import load_config

    root, _, _, _ = encoded
    c = load_config("imagenet256_dit", "tiny")
    with c.unlocked():
        c.data.name = "latents"
        c.data.latents_dir = str(root / "latents")
        c.data.image_size, c.data.channels = 4, 4
        c.data.batch_size = 4
        c.model.input_size, c.model.in_channels, c.model.num_classes = 4, 4, 3
        c.diffusion.vlb_bins = 256
        c.sample.vae = str(root / "vae")
        c.sample.num = 2
    check_config(c)
    summary = train(c, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    grid = np.asarray(Image.open(summary["samples"]))
    assert grid.shape[2] == 3 and min(grid.shape[:2]) >= SIZE  # decoded 16x16 RGB images, not 4x4 latents
    with c.unlocked():
        c.model.num_classes = 2  # the folder has 3 classes: label 2 would be the null class
    with pytest.raises(ValueError, match="the dataset has 3 classes but config.model.num_classes=2"):
        train(c, str(tmp_path / "run2"), progress=False)
    with c.unlocked():
        c.model.num_classes = 3
        c.data.flip = True
    with pytest.raises(ValueError, match="flips latents"):
        check_config(c)
    with c.unlocked():
        c.data.flip, c.data.latents_dir = False, ""
    with pytest.raises(ValueError, match="needs config.data.latents_dir"):
        check_config(c)


def test_train_step_trains_on_the_draw_not_the_mean():
    from jaxdiff.modeling import build_model
    from jaxdiff.train.loop import make_init_fn
    from jaxdiff.train.state import make_optimizer
    from jaxdiff.train.step import make_train_step
    from tests.helpers import load_config

    # the draw is the step's, whatever the network: the toy MLP compiles in a fraction of a DiT's time
    cfg = load_config("toy2d", "tiny")
    model, tx = build_model(cfg), make_optimizer(cfg)
    state = make_init_fn(cfg, model, tx)(jax.random.key(0))
    # a network that predicts 0 (e.g. a fresh adaLN-Zero DiT) has a loss that does not depend on the example: perturb
    leaves, tree = jax.tree.flatten(state.params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    state = dataclasses.replace(state, params=jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                                            for p, k in zip(leaves, keys)]))
    step = jax.jit(make_train_step(cfg, model, tx))
    mean = jax.random.uniform(jax.random.key(1), (8, 2), minval=-1, maxval=1)
    label = jnp.zeros(8, jnp.int32)
    loss = {name: float(step(state, {"image": mean, "image_std": std, "label": label})[1]["loss"])
            for name, std in (("std0", jnp.zeros_like(mean)), ("std1", jnp.ones_like(mean)))}
    plain = float(jax.jit(make_train_step(cfg, model, tx))(state, {"image": mean, "label": label})[1]["loss"])
    # std 0 trains on the mean itself, with every other key of the step as it was; std 1 on another example
    assert loss["std0"] == plain and loss["std1"] != plain


def test_encode_command(assets, tmp_path):
    from tests.helpers import run_python

    root, _ = assets
    out = tmp_path / "latents"
    proc = run_python(["-m", "jaxdiff.cli", "encode", f"--vae={root / 'vae'}", f"--image_folder={root / 'images'}",
                       f"--out={out}", f"--image_size={SIZE}", "--batch_size=4", "--noprogress", "--noflip"])
    summary = json.loads(proc.stdout)
    assert summary["num_examples"] == len(SHAPES) and summary["views"] == ["image"]
    assert summary["train_with"] == f"--config.data.name=latents --config.data.latents_dir={out}"
    assert len(LatentSource(str(out))) == len(SHAPES)
    with pytest.raises(AssertionError, match="needs --vae VAE_DIR"):
        run_python(["-m", "jaxdiff.cli", "encode", f"--out={out}"])
    with pytest.raises(AssertionError, match="exactly one of --image_folder"):
        run_python(["-m", "jaxdiff.cli", "encode", f"--vae={root / 'vae'}", f"--out={out}"])
    with pytest.raises(AssertionError, match="not a plain name: pass --out_split"):
        run_python(["-m", "jaxdiff.cli", "encode", f"--vae={root / 'vae'}", f"--image_folder={root / 'images'}",
                    f"--out={out}", "--split=train[:50%]"])
    with pytest.raises(AssertionError, match="reference statistics are of images"):
        run_python(["-m", "jaxdiff.cli", "stats", "--config=configs/imagenet256_dit.py",
                    f"--config.data.latents_dir={out}", f"--out={tmp_path / 'stats.npz'}"])


def test_encoding_on_four_devices_equals_one(encoded, tmp_path):
    """The batch split over 4 XLA host devices (the last batch padded) writes what one device writes."""
    from tests.helpers import run_python

    root, _, _, _ = encoded
    out = tmp_path / "four"
    run_python(["-m", "jaxdiff.cli", "encode", f"--vae={root / 'vae'}", f"--image_folder={root / 'images'}",
                f"--out={out}", f"--image_size={SIZE}", "--batch_size=4", "--noprogress"],
               env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    for k in ("mean", "std"):
        got, want = np.load(out / "train" / f"{k}.npy"), np.load(root / "latents" / "train" / f"{k}.npy")
        assert rel(got, want) < 1e-5
    np.testing.assert_array_equal(np.load(out / "train" / "label.npy"), np.load(root / "latents" / "train" / "label.npy"))
