"""The digits classifier (the embedded default's feature extractor) on held-out digits."""

import numpy as np
import pytest

from jaxdiff.data.digits import load_digits
from jaxdiff.metrics import digits_classifier as D


def test_committed_weights_classify_held_out_digits():
    x, y = load_digits("test")  # never seen in training (experiments/digits_classifier/train.py)
    assert D.class_accuracy(x, y) > 0.95
    f, logits = D.features_and_logits(x)
    assert f.shape == (len(x), D.FEATURE_DIM) and logits.shape == (len(x), 10)
    # shuffled labels: chance level, so the accuracy above is not an artefact of the metric
    assert D.class_accuracy(x, np.roll(y, 1)) < 0.3


def test_digits_fd_separates_real_from_corrupted_digits():
    x_te, _ = load_digits("test")
    x_tr, _ = load_digits("train")
    real = D.digits_frechet_distance(x_te, x_tr)
    noisy = D.digits_frechet_distance(np.clip(x_te + 0.5 * np.random.default_rng(0).standard_normal(x_te.shape),
                                              -1, 1).astype(np.float32), x_tr)
    assert 0 < real < noisy / 5


def test_wrong_shape_and_missing_weights_errors(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 8, 8, 1\)"):
        D.features_and_logits(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(FileNotFoundError, match="experiments/digits_classifier/train.py"):
        D.load_params(str(tmp_path / "none.npz"))


@pytest.mark.slow
def test_training_from_scratch_reaches_95_percent(tmp_path):
    x, y = load_digits("train")
    params = D.train_classifier(x, y, seed=1, steps=2000)
    path = D.save_params(params, str(tmp_path / "w.npz"))
    x_te, y_te = load_digits("test")
    assert D.class_accuracy(x_te, y_te, D.load_params(path)) > 0.95
