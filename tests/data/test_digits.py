"""Tests for jaxdiff.data.digits (sklearn's bundled 8x8 digits)."""

import numpy as np
import pytest

from jaxdiff.data import DigitsSource, load_digits


def _rows(images, labels):
    """Sorted multiset of (image, label) rows, for coverage checks robust to duplicates."""
    flat = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return flat[np.lexsort(flat.T[::-1])]


def test_all_shapes_range_labels():
    images, labels = load_digits("all")
    assert images.shape == (1797, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int32
    assert images.min() == -1.0 and images.max() == 1.0
    # x / 8 - 1 of integers in [0, 16]: values on the grid k / 8 - 1.
    np.testing.assert_array_equal((images + 1.0) * 8.0, np.round((images + 1.0) * 8.0))
    np.testing.assert_array_equal(np.unique(labels), np.arange(10))


def test_train_test_disjoint_cover_and_stratified():
    tr_x, tr_y = load_digits("train")
    te_x, te_y = load_digits("test")
    all_x, all_y = load_digits("all")
    assert len(tr_y) + len(te_y) == 1797
    assert abs(len(te_y) - 180) <= 1
    # Union (as a multiset) equals the full set, so the split is a partition.
    np.testing.assert_array_equal(
        _rows(np.concatenate([tr_x, te_x]), np.concatenate([tr_y, te_y])), _rows(all_x, all_y))
    # Stratified: every class in both halves, proportions close to the full set.
    test_frac = np.bincount(te_y, minlength=10) / len(te_y)
    all_frac = np.bincount(all_y, minlength=10) / len(all_y)
    assert np.all(np.bincount(te_y, minlength=10) > 0)
    np.testing.assert_allclose(test_frac, all_frac, atol=0.01)


def test_split_is_deterministic_and_seeded():
    a = load_digits("test", seed=0)
    b = load_digits("test", seed=0)
    c = load_digits("test", seed=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert len(load_digits("test", holdout_fraction=0.25)[1]) == 450


def test_invalid_arguments():
    with pytest.raises(ValueError, match="train"):
        load_digits("validation")
    with pytest.raises(ValueError):
        load_digits("test", holdout_fraction=0.0)


def test_returned_arrays_do_not_alias_cache():
    x, _ = load_digits("all")
    x[...] = 5.0
    assert load_digits("all")[0].max() == 1.0


def test_digits_source():
    src = DigitsSource("test")
    assert len(src) == len(load_digits("test")[1])
    batch = src[np.array([0, 5, 5])]
    assert batch["image"].shape == (3, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["image"][1], batch["image"][2])
    np.testing.assert_array_equal(batch["label"], load_digits("test")[1][[0, 5, 5]])
