"""Reading images for ``jaxdiff encode``: ADM's centre crop against closed forms (area averages,
plain crops), and the ImageFolder order / labels of torchvision's ``ImageFolder``."""

import numpy as np
import pytest
from PIL import Image

from jaxdiff.data.images import ImageFolderImages, center_crop_arr, to_rgb_uint8


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
