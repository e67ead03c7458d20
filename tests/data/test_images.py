"""Reading images for ``jaxdiff encode``: ADM's centre crop against closed forms (area averages,
plain crops), and the ImageFolder order / labels of torchvision's ``ImageFolder``."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.images import ImageFolderImages, ImageFolderSource, center_crop_arr, to_rgb_image, to_rgb_uint8


def _random_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("factor", [2, 4])
def test_images_at_least_twice_the_size_are_area_averaged(factor):
    s = 12
    arr = _random_rgb(factor * s, factor * s)
    got = center_crop_arr(Image.fromarray(arr), s).astype(np.float64)
    want = arr.reshape(s, factor, s, factor, 3).astype(np.float64).mean(axis=(1, 3))
    # Pillow filters rows, then columns, rounding to uint8 after each pass and each halving: within
    # one level per halving (a crop or a nearest-neighbour pick of random pixels is ~40-85 levels off)
    err = np.abs(got - want)
    halvings = int(np.log2(factor))
    assert got.shape == (s, s, 3) and err.max() <= halvings and err.mean() < 0.75 * halvings


@pytest.mark.parametrize("shape", [(16, 23), (29, 16)])
def test_short_side_at_the_target_is_a_plain_centre_crop(shape):
    h, w = shape
    arr = _random_rgb(h, w, seed=1)
    got = center_crop_arr(Image.fromarray(arr), 16)
    top, left = (h - 16) // 2, (w - 16) // 2
    np.testing.assert_array_equal(got, arr[top:top + 16, left:left + 16])


@pytest.mark.parametrize("shape", [(37, 50), (50, 37), (9, 9), (100, 33)])
def test_any_size_and_mode_gives_a_square_rgb_crop(shape):
    arr = _random_rgb(*shape, seed=2)
    for image in (Image.fromarray(arr), Image.fromarray(arr).convert("L"), Image.fromarray(arr).convert("RGBA"), arr):
        got = center_crop_arr(image, 16)
        assert got.shape == (16, 16, 3) and got.dtype == np.uint8
    # a constant image stays constant through the box and bicubic filters
    flat = np.full(shape + (3,), 77, np.uint8)
    assert np.all(center_crop_arr(flat, 16) == 77)


def test_to_rgb_uint8_refuses_float_images():
    assert to_rgb_uint8(np.zeros((4, 4), np.uint8)).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        to_rgb_uint8(np.zeros((4, 4, 3), np.float32))


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    # Pillow's convert("RGB") clips 16-bit values at 255: a 0..65535 ramp came out almost white
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp16.png")
    with Image.open(tmp_path / "a" / "ramp16.png") as im:
        assert im.mode.startswith("I")
        rgb = np.asarray(to_rgb_image(im))
    want = np.rint(ramp / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.repeat(want[..., None], 3, axis=-1))
    img = ImageFolderSource(str(tmp_path), image_size=16)[np.array([0])]["image"][0]
    np.testing.assert_allclose(img[..., 0], want / 127.5 - 1.0, atol=1e-6)
    assert img.min() == -1.0 and abs(img.mean()) < 0.02  # the ramp's mean, not ~1 (white)
    with pytest.raises(ValueError, match="mode 'F'"):
        to_rgb_image(Image.fromarray(np.zeros((2, 2), np.float32)))


def test_image_folder_follows_torchvision_order_and_labels(tmp_path):
    files = ["b_cls/z.png", "b_cls/a.JPG", "a_cls/sub/y.png", "a_cls/x.PNG", "a_cls/notes.txt", "c_cls/deep/er/w.bmp"]
    for f in files:
        p = tmp_path / f
        p.parent.mkdir(parents=True, exist_ok=True)
        if f.endswith(".txt"):
            p.write_text("not an image")
        else:
            Image.fromarray(_random_rgb(8, 8)).save(p, format="PNG" if "png" in f.lower() else
                                                    ("JPEG" if "jpg" in f.lower() else "BMP"))
    (tmp_path / "empty_cls").mkdir()
    images = ImageFolderImages(str(tmp_path))
    assert images.classes == ["a_cls", "b_cls", "c_cls", "empty_cls"]
    rel = [p[len(str(tmp_path)) + 1:] for p in images.paths]
    # torchvision: classes sorted; per class sorted(os.walk(...)) then sorted file names; extension check lower-cased
    assert rel == ["a_cls/x.PNG", "a_cls/sub/y.png", "b_cls/a.JPG", "b_cls/z.png", "c_cls/deep/er/w.bmp"]
    assert images.labels.tolist() == [0, 0, 1, 1, 2]
    image, label = images.read(2)
    assert label == 1 and image.mode == "RGB" and image.size == (8, 8)
    assert images.describe()["num_classes"] == 4


def test_image_folder_errors_say_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderImages(str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="no class sub-directories"):
        ImageFolderImages(str(tmp_path))
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolderImages(str(tmp_path))


def _folder(root, shapes, classes=2):
    rng = np.random.default_rng(5)
    for i, (h, w) in enumerate(shapes):
        d = root / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")
    return root


def test_image_folder_source_crops_scales_and_labels(tmp_path):
    from jaxdiff.data import ImageFolderSource, make_source

    root = _folder(tmp_path / "imgs" / "train", [(12, 20), (8, 8), (30, 17), (16, 16), (9, 11)])
    src = make_source({"name": "image_folder", "image_folder": str(tmp_path / "imgs"), "image_size": 8}, "train")
    assert isinstance(src, ImageFolderSource) and len(src) == 5
    files = ImageFolderImages(str(root))
    b = src[np.array([[4, 0], [-1, 2]])]
    assert b["image"].shape == (2, 2, 8, 8, 3) and b["image"].dtype == np.float32
    for (r, c), i in np.ndenumerate(np.array([[4, 0], [4, 2]])):
        want = center_crop_arr(Image.open(files.paths[i]), 8).astype(np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(b["image"][r, c], want, atol=1e-6)
        assert b["label"][r, c] == files.labels[i]
    gray = ImageFolderSource(str(root), image_size=8, channels=1)[np.array([1])]["image"][0]
    want = np.asarray(Image.fromarray(center_crop_arr(Image.open(files.paths[1]), 8)).convert("L"))
    np.testing.assert_allclose(gray[..., 0], want.astype(np.float32) / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(IndexError):
        src[np.array([5])]
    with pytest.raises(FileNotFoundError, match="no 'test' sub-directory"):
        make_source({"name": "image_folder", "image_folder": str(tmp_path / "imgs"), "image_size": 8}, "test")
    with pytest.raises(ValueError, match="1 \\(gray\\) or 3 \\(RGB\\)"):
        ImageFolderSource(str(root), image_size=8, channels=4)


@pytest.mark.slow  # ~29 s on CI's CPU; tests/test_encode.py trains from an image folder's latents
def test_a_unet_trains_on_an_image_folder(tmp_path):
    from jaxdiff.config_base import check_config
    from jaxdiff.train import train
    from tests.helpers import load_config

    root = _folder(tmp_path / "imgs", [(10 + i, 12 + 2 * i) for i in range(6)], classes=3)
    c = load_config("digits", "tiny")
    with c.unlocked():
        c.data.name, c.data.image_folder, c.data.flip = "image_folder", str(root), True
        c.data.channels = 3
        c.model.num_classes = 3
        c.data.batch_size = 4
        c.sample.num, c.sample.steps = 2, 2
        c.train.num_steps, c.train.log_every, c.train.ckpt_every = 2, 1, 2
    check_config(c)
    summary = train(c, str(tmp_path / "run"), progress=False)
    assert summary["steps"] == int(c.train.num_steps) and np.isfinite(summary["final_loss"])
    with c.unlocked():
        c.data.image_folder = ""
    with pytest.raises(ValueError, match="needs config.data.image_folder"):
        check_config(c)
