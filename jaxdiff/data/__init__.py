"""Data sources and the deterministic batch pipeline.

A *source* is any object with ``__len__()`` and batched ``__getitem__(indices) -> dict`` giving
``"image"`` (float32 in [-1, 1]) and ``"label"`` (int32). :func:`batch_iterator` turns a source
into a resumable, multi-process, prefetched stream of batches.

This package is a leaf: numpy, jax (toy2d), scikit-learn (digits, lazily) and
tensorflow_datasets (lazily, inside :mod:`jaxdiff.data.tfds_source` functions), Pillow (lazily,
:mod:`jaxdiff.data.images`).
"""

from __future__ import annotations

from typing import Any

from jaxdiff.data.digits import DigitsSource, load_digits
from jaxdiff.data.images import ImageFolderSource
from jaxdiff.data.latents import LatentSource
from jaxdiff.data.pipeline import (
    ArraySource,
    BatchIterator,
    Source,
    batch_iterator,
    global_batch_indices,
    random_flip,
)
from jaxdiff.data.tfds_source import DatasetNotFoundError, TfdsSource, UnknownDatasetError
from jaxdiff.data.toy2d import (
    TOY2D_NAMES,
    Toy2DSource,
    gmm8_params,
    sample_toy2d,
    sample_toy2d_labeled,
)

__all__ = [
    "ArraySource",
    "BatchIterator",
    "DATA_NAMES",
    "DatasetNotFoundError",
    "DigitsSource",
    "ImageFolderSource",
    "LatentSource",
    "Source",
    "TOY2D_NAMES",
    "TfdsSource",
    "Toy2DSource",
    "UnknownDatasetError",
    "batch_iterator",
    "global_batch_indices",
    "gmm8_params",
    "load_digits",
    "make_source",
    "random_flip",
    "sample_toy2d",
    "sample_toy2d_labeled",
]

DATA_NAMES = ("digits", "toy2d", "tfds", "image_folder", "latents")

_MISSING = object()


def _get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """Reads ``key`` from a Mapping / ml_collections ConfigDict / attribute object."""
    try:
        value = cfg[key]
    except (KeyError, AttributeError, TypeError):
        value = getattr(cfg, key, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise KeyError(f"data config is missing required key {key!r}")
        return default
    return value


def _label_key(data_cfg: Any) -> str | None:
    """``data.label_key``: "label" when the key is absent; ``None`` or ``""`` (no labels) kept."""
    try:
        value = data_cfg["label_key"]
    except (KeyError, AttributeError, TypeError):
        value = getattr(data_cfg, "label_key", "label")
    return str(value) if value else None


def make_source(data_cfg: Any, split: str = "train"):
    """Builds a source from a data config (Mapping or ConfigDict) with key ``name``. The keys
    read below are ``config.data`` keys of :func:`jaxdiff.config_base.base_config`, with these
    defaults, so each can be overridden on the command line (``--config.data.holdout_fraction=0.2``):

    * ``"digits"``: :class:`DigitsSource` (reads ``holdout_fraction`` = 0.1, ``split_seed`` = 0);
      ``split`` in {"train", "test", "all"}.
    * ``"toy2d"``: :class:`Toy2DSource` (reads ``toy`` = "gmm8", ``num_points`` = 65536,
      ``seed`` = 0); ``split`` in {"train", "test"}.
    * ``"tfds"``: :class:`TfdsSource` (reads ``tfds_name`` (required), ``data_dir`` = None,
      ``image_key`` = "image", ``label_key`` = "label": read if the dataset has it; another name
      must exist; ``""`` reads no labels); ``split`` is any TFDS split string.
    * ``"image_folder"``: :class:`ImageFolderSource` over ``<image_folder>/<split>`` (or
      ``image_folder`` itself for "train"; reads ``image_folder`` (required), ``image_size``,
      ``channels`` = 3): images cropped as ADM / DiT crop ImageNet, labels from the class folders.
    * ``"latents"``: :class:`LatentSource` over ``<latents_dir>/<split>`` made by ``jaxdiff encode``
      (reads ``latents_dir`` (required), ``latent_posterior`` = "sample").
    """
    name = _get(data_cfg, "name")
    if name == "digits":
        return DigitsSource(
            split=split,
            holdout_fraction=float(_get(data_cfg, "holdout_fraction", 0.1)),
            seed=int(_get(data_cfg, "split_seed", 0)),
        )
    if name == "toy2d":
        return Toy2DSource(
            str(_get(data_cfg, "toy", "gmm8")),
            n=int(_get(data_cfg, "num_points", 65536)),
            seed=int(_get(data_cfg, "seed", 0)),
            split=split,
        )
    if name == "tfds":
        return TfdsSource(
            str(_get(data_cfg, "tfds_name")),
            split=split,
            data_dir=_get(data_cfg, "data_dir", None) or None,
            image_key=str(_get(data_cfg, "image_key", "image")),
            label_key=_label_key(data_cfg),
        )
    if name == "image_folder":
        from jaxdiff.data.images import image_folder_split

        root = str(_get(data_cfg, "image_folder", ""))
        if not root:
            raise ValueError("data.name='image_folder' needs data.image_folder: a root/<class>/<image> tree")
        return ImageFolderSource(image_folder_split(root, split), image_size=int(_get(data_cfg, "image_size")),
                                 channels=int(_get(data_cfg, "channels", 3)))
    if name == "latents":
        root = str(_get(data_cfg, "latents_dir", ""))
        if not root:
            raise ValueError("data.name='latents' needs data.latents_dir: the --out folder of `jaxdiff encode`")
        return LatentSource(root, split=split, posterior=str(_get(data_cfg, "latent_posterior", "sample")))
    raise ValueError(f"unknown data source name {name!r}; valid names: {', '.join(DATA_NAMES)}")
