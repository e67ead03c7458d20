"""scikit-learn's 8x8 handwritten digits (1797 images, bundled with scikit-learn; no download).

Pixels are integers in [0, 16]; they are mapped to [-1, 1] by ``x / 8 - 1``.
The train/test split is a seeded *stratified* split (sklearn ``train_test_split``), so both
halves contain every class in the same proportions; train and test are disjoint, sorted by
original index, and together cover all 1797 examples.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxdiff.data.pipeline import ArraySource

__all__ = ["load_digits", "DigitsSource", "NUM_DIGITS", "SPLITS"]

NUM_DIGITS = 1797
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # lazy: sklearn import is slow

    bunch = datasets.load_digits()
    images = (bunch.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # (N, 8, 8, 1)
    labels = bunch.target.astype(np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=16)
def _split_indices(holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, labels = _load_all()
    idx = np.arange(labels.shape[0])
    train_idx, test_idx = train_test_split(
        idx, test_size=holdout_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def load_digits(
    split: str = "train", holdout_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(images, labels)``: float32 (n, 8, 8, 1) in [-1, 1] and int32 (n,) in [0, 9].

    Args:
      split: ``"train"``, ``"test"`` (a stratified ``holdout_fraction`` of the data), or ``"all"``.
      holdout_fraction: fraction of examples in ``"test"``, in (0, 1). Ignored for ``"all"``.
      seed: seed of the stratified split. Ignored for ``"all"``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; valid splits: {', '.join(SPLITS)}")
    images, labels = _load_all()
    if split == "all":
        return images.copy(), labels.copy()
    holdout_fraction = float(holdout_fraction)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    train_idx, test_idx = _split_indices(holdout_fraction, int(seed))
    idx = train_idx if split == "train" else test_idx
    return images[idx], labels[idx]


class DigitsSource(ArraySource):
    """:class:`ArraySource` over :func:`load_digits` (images (n, 8, 8, 1) in [-1, 1])."""

    def __init__(self, split: str = "train", holdout_fraction: float = 0.1, seed: int = 0):
        images, labels = load_digits(split, holdout_fraction=holdout_fraction, seed=seed)
        super().__init__(images, labels)
        self.split = split
