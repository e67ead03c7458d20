"""Tests for jaxdiff.data.tfds_source (no TensorFlow, no network).

Two complementary setups:

* ``tfds.testing.mock_data`` drives ``tfds.data_source("mnist")`` with random fake records
  (registered dataset metadata, no files). tfds 4.9.10's mock installs ``__getitems__`` as an
  unbound ``functools.partial`` on a MagicMock, so batched reads fail with a TypeError inside
  tfds; ``TfdsSource`` then reads record by record, which these tests exercise (unpatched).
* A tiny real dataset is generated on disk in the array_record format with a
  ``tfds.core.GeneratorBasedBuilder`` (PIL images, so encoding needs no TensorFlow) and is read
  back through the real ``tfds.data_source`` / ArrayRecord / PIL decoding path, as a prepared
  dataset would be (the builder class is not registered; tfds finds it from the files).
"""

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jaxdiff.data import (  # noqa: E402
    DatasetNotFoundError,
    TfdsSource,
    UnknownDatasetError,
    batch_iterator,
    make_source,
)
from jaxdiff.data.images import TfdsImages  # noqa: E402

TINY = "jaxdiff_test_tiny"
TINY_UNLABELED = "jaxdiff_test_unlabeled"
TINY_VARSIZE = "jaxdiff_test_varsize"


def _tiny_examples(n, shape, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    images[0] = 0
    images[1] = 255  # make sure both ends of the range appear
    return images, np.arange(n) % 3


def _build_tiny_datasets(data_dir):
    import PIL.Image
    from tensorflow_datasets.core import registered

    def pil(img):
        return PIL.Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)

    with registered.skip_registration():

        class JaxdiffTestTiny(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            code_path = None  # no checksums file; avoids tfds' importlib_resources lookup

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    disable_shuffling=True,  # keep generation order (record i = example i)
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(4, 4, 3)),
                        "label": tfds.features.ClassLabel(num_classes=3),
                    }),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(12, 0),
                        "test": self._generate_examples(5, 1)}

            def _generate_examples(self, n, seed):
                images, labels = _tiny_examples(n, (4, 4, 3), seed)
                for i in range(n):
                    yield i, {"image": pil(images[i]), "label": int(labels[i])}

        class JaxdiffTestUnlabeled(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            code_path = None  # no checksums file; avoids tfds' importlib_resources lookup

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    disable_shuffling=True,  # keep generation order (record i = example i)
                    features=tfds.features.FeaturesDict(
                        {"image": tfds.features.Image(shape=(5, 6, 1))}),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(7)}

            def _generate_examples(self, n):
                images, _ = _tiny_examples(n, (5, 6, 1), 2)
                for i in range(n):
                    yield i, {"image": pil(images[i])}

        class JaxdiffTestVarsize(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            code_path = None

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self, disable_shuffling=True,
                    features=tfds.features.FeaturesDict({
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(num_classes=2)}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i, shape in enumerate([(8, 8, 3), (10, 8, 3)]):
                    yield i, {"image": pil(np.zeros(shape, np.uint8)), "label": i}

    for cls in (JaxdiffTestTiny, JaxdiffTestUnlabeled, JaxdiffTestVarsize):
        cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    _build_tiny_datasets(data_dir)
    return str(data_dir)


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_real_array_record_values(tiny_dir):
    src = TfdsSource(TINY, split="train", data_dir=tiny_dir)
    assert len(src) == 12
    images, labels = _tiny_examples(12, (4, 4, 3), 0)
    idx = np.array([3, 0, 1, 11, 3])
    batch = src[idx]
    assert batch["image"].shape == (5, 4, 4, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (5,) and batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], images[idx] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], labels[idx])
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    assert len(TfdsSource(TINY, split="test", data_dir=tiny_dir)) == 5
    assert len(TfdsSource(TINY, split="train[:50%]", data_dir=tiny_dir)) == 6


def test_unlabeled_grayscale_gives_zero_labels(tiny_dir):
    src = TfdsSource(TINY_UNLABELED, data_dir=tiny_dir)
    images, _ = _tiny_examples(7, (5, 6, 1), 2)
    batch = src[np.arange(7)]
    assert batch["image"].shape == (7, 5, 6, 1)
    np.testing.assert_allclose(batch["image"], images / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], np.zeros(7, np.int32))
    assert batch["label"].dtype == np.int32
    assert src.num_classes is None and src.has_labels is False
    with pytest.raises(KeyError, match="pixels"):
        TfdsSource(TINY_UNLABELED, data_dir=tiny_dir, image_key="pixels")


def test_label_key_rules(tiny_dir):
    # a misspelt label feature is an error naming the features, not silently zero labels
    with pytest.raises(KeyError, match=r"no label feature 'lable'.*\['image', 'label'\]"):
        TfdsSource(TINY, data_dir=tiny_dir, label_key="lable")
    with pytest.raises(KeyError, match="'lable'"):
        TfdsImages(TINY, data_dir=tiny_dir, label_key="lable")
    # "" (or None) reads no labels, also from the config
    src = make_source({"name": "tfds", "tfds_name": TINY, "data_dir": tiny_dir, "label_key": ""})
    assert src.has_labels is False and src.num_classes is None
    np.testing.assert_array_equal(src[np.arange(12)]["label"], np.zeros(12, np.int32))
    src = make_source({"name": "tfds", "tfds_name": TINY, "data_dir": tiny_dir, "label_key": None})
    assert src.has_labels is False
    assert make_source({"name": "tfds", "tfds_name": TINY, "data_dir": tiny_dir}).has_labels is True


def test_class_conditional_model_refuses_unlabeled_data(tiny_dir):
    from jaxdiff.config_base import base_config
    from jaxdiff.train.loop import check_data_labels

    config = base_config()
    config.model.num_classes = 3
    with pytest.raises(ValueError, match="has no labels"):
        check_data_labels(config, TfdsSource(TINY_UNLABELED, data_dir=tiny_dir))
    check_data_labels(config, TfdsSource(TINY, data_dir=tiny_dir))
    config.model.num_classes = 0
    check_data_labels(config, TfdsSource(TINY_UNLABELED, data_dir=tiny_dir))


def test_images_of_varying_size_are_refused_up_front(tiny_dir):
    with pytest.raises(ValueError, match=r"varying size.*\(None, None, 3\).*image_folder.*jaxdiff encode"):
        TfdsSource(TINY_VARSIZE, data_dir=tiny_dir)
    # the encoder crops each image, so it reads them
    images = TfdsImages(TINY_VARSIZE, data_dir=tiny_dir)
    assert [images.read(i)[0].shape for i in range(2)] == [(8, 8, 3), (10, 8, 3)]


def test_batch_iterator_over_real_tfds(tiny_dir):
    src = make_source({"name": "tfds", "tfds_name": TINY, "data_dir": tiny_dir})
    kw = dict(seed=0, process_index=0, process_count=1)
    with batch_iterator(src, 4, **kw) as it:
        first = [next(it) for _ in range(6)]
    with batch_iterator(src, 4, start_step=3, prefetch=0, **kw) as it:
        resumed = [next(it) for _ in range(3)]
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # First 3 batches = one epoch: the stacked images are the whole split, permuted.
    epoch = np.concatenate([b["image"] for b in first[:3]])
    expected = src[np.random.default_rng([0, 0]).permutation(12)]["image"]
    np.testing.assert_array_equal(epoch, expected)


def test_mock_data_source_shapes_and_values(mock_tfds):
    src = TfdsSource("mnist", split="train")
    assert len(src) == 40
    batch = src[np.array([5, 1, 5, 39])]
    assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.1  # random fake pixels, not a constant
    assert np.all((batch["label"] >= 0) & (batch["label"] < 10))
    assert src.num_classes == 10  # mnist's ClassLabel: what the trainer checks the model against
    np.testing.assert_array_equal(batch["image"][0], batch["image"][2])
    record = src.data_source[1]  # single-record path of tfds itself
    np.testing.assert_allclose(batch["image"][1], record["image"] / 127.5 - 1.0, atol=1e-6)
    assert batch["label"][1] == int(record["label"])


def test_mock_data_batch_iterator_deterministic(mock_tfds):
    src = make_source({"name": "tfds", "tfds_name": "mnist"})
    kw = dict(seed=9, process_index=0, process_count=1)
    with batch_iterator(src, 8, **kw) as a, batch_iterator(src, 8, prefetch=0, **kw) as b:
        for _ in range(7):  # crosses the 40-example epoch boundary
            x, y = next(a), next(b)
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])
    halves = [
        next(batch_iterator(src, 8, seed=9, process_index=p, process_count=2, prefetch=0))
        for p in range(2)
    ]
    full = next(batch_iterator(src, 8, **kw))
    np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves]), full["image"])


def test_missing_dataset_error_names_dataset_dir_and_fix(tmp_path):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        TfdsSource("mnist", split="train", data_dir=str(empty))
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "'mnist'" in msg and str(empty) in msg
    assert "tfds build mnist" in msg and "array_record" in msg and "network" in msg
    assert list(empty.iterdir()) == []  # nothing downloaded or created


def test_missing_dataset_default_data_dir(tmp_path, monkeypatch):
    from tensorflow_datasets.core import constants

    monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="default") as info:
        make_source({"name": "tfds", "tfds_name": "cifar10"})
    assert str(tmp_path) in str(info.value) and "cifar10" in str(info.value)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(UnknownDatasetError, match="not a registered TFDS dataset") as info:
        TfdsSource("mnistt", data_dir=str(tmp_path))
    assert isinstance(info.value, DatasetNotFoundError) and isinstance(info.value, ValueError)
    assert "mnist" in str(info.value).split("Did you mean")[-1]


def test_import_is_lazy():
    import pathlib
    import subprocess
    import sys

    import jaxdiff

    code = ("import sys, jaxdiff.data; "
            "sys.exit(int('tensorflow_datasets' in sys.modules or 'tensorflow' in sys.modules))")
    root = pathlib.Path(jaxdiff.__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_float_features_are_read_as_stored(monkeypatch):
    """A float feature (e.g. SD-VAE latents scaled by 0.18215, in a TFDS dataset one prepared)
    reaches the model unchanged; integer images are mapped to [-1, 1]."""
    from jaxdiff.data import tfds_source

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    records = [{"latent": latents[i], "label": i % 3} for i in range(8)]
    monkeypatch.setattr(tfds_source, "open_data_source", lambda *a, **k: records)
    src = tfds_source.TfdsSource("fake_latents", image_key="latent")
    batch = src[np.arange(8)]
    assert batch["image"].dtype == np.float32
    np.testing.assert_array_equal(batch["image"], latents)
    np.testing.assert_array_equal(batch["label"], np.arange(8) % 3)
    ints = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(tfds_source.to_unit_range(ints), [[-1.0, 1.0]])
    np.testing.assert_array_equal(tfds_source.to_unit_range(np.array([0, 65535], np.uint16)), [-1.0, 1.0])


def test_tfds_images_for_encoding(tiny_dir):
    """``jaxdiff encode --tfds``: the reader returns the stored uint8 pixels (gray as RGB) and labels."""
    from jaxdiff.data.images import TfdsImages, center_crop_arr

    imgs = TfdsImages(TINY, split="train", data_dir=tiny_dir)
    want, labels = _tiny_examples(12, (4, 4, 3), 0)
    assert len(imgs) == 12 and imgs.describe()["num_classes"] == 3
    for i in (0, 1, 7):
        image, label = imgs.read(i)
        np.testing.assert_array_equal(image, want[i])
        assert label == labels[i]
        np.testing.assert_array_equal(center_crop_arr(image, 4), want[i])  # already the crop's size
    gray = TfdsImages(TINY_UNLABELED, split="train", data_dir=tiny_dir)
    image, label = gray.read(3)
    g, _ = _tiny_examples(7, (5, 6, 1), 2)
    assert label == 0 and gray.describe()["label_key"] is None
    np.testing.assert_array_equal(image, np.repeat(g[3], 3, axis=-1))
    with pytest.raises(KeyError, match="no feature 'latent'"):
        TfdsImages(TINY, data_dir=tiny_dir, image_key="latent")
