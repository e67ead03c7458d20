"""Random-access TFDS source via ``tfds.data_source`` (array_record files; no TensorFlow).

``tensorflow_datasets`` is imported lazily inside the functions so that ``import jaxdiff.data``
stays fast. Reading needs only ``tensorflow-datasets`` + ``array_record`` (+ Pillow/OpenCV for
encoded images), but the dataset must already be *prepared* on disk in the ``array_record``
file format. Preparing it (``tfds build``) needs TensorFlow and network access once.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

import numpy as np

__all__ = ["DatasetNotFoundError", "UnknownDatasetError", "TfdsSource", "to_unit_range"]


class DatasetNotFoundError(FileNotFoundError):
    """The requested dataset is not available (not prepared) in the searched data_dir."""


class UnknownDatasetError(DatasetNotFoundError, ValueError):
    """The name is not a registered TFDS dataset (and no prepared copy was found by that name)."""


def _default_data_dir() -> str:
    from tensorflow_datasets.core import constants

    return os.fspath(os.path.expanduser(constants.DATA_DIR))


def _prepare_hint(name: str, data_dir: str) -> str:
    base = name.split(":")[0]
    return (
        "tfds.data_source reads the dataset from the array_record file format, which must be "
        "prepared once (this needs network access and TensorFlow, only for the preparation):\n"
        "    pip install tensorflow\n"
        f"    tfds build {base} --data_dir {data_dir} --file_format=array_record\n"
        "then point the config's data_dir (or $TFDS_DATA_DIR) at that directory. A copy prepared "
        "elsewhere can be copied into the data_dir as is."
    )


def _not_prepared_error(name: str, data_dir: str | None, split: str, builder=None):
    if data_dir is not None:
        searched = os.fspath(data_dir)
        where = f"data_dir {searched!r}"
    else:
        from tensorflow_datasets.core.utils import file_utils

        root = builder.data_dir_root if builder is not None else _default_data_dir()
        searched = os.fspath(root)
        others = sorted({os.fspath(d) for d in file_utils.list_data_dirs()} - {searched})
        where = (f"data_dir {searched!r} (tfds's default; set data_dir or $TFDS_DATA_DIR to "
                 "change it")
        where += f"; also searched {others})" if others else ")"
    variant = f" (looked for {builder.data_dir})" if builder is not None else ""
    msg = (
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in {where}{variant}.\n"
        + _prepare_hint(name, searched)
    )
    return DatasetNotFoundError(msg)


def _wrong_format_error(name: str, builder, split: str):
    fmt = builder.info.file_format
    fmt = getattr(fmt, "value", fmt)
    return DatasetNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is prepared at {builder.data_dir} in the "
        f"{fmt!r} file format, but tfds.data_source needs random access (array_record). Convert "
        f"it with\n    tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record\nor rebuild it:\n"
        + _prepare_hint(name, os.fspath(builder.data_dir_root))
    )


def _unknown_error(name: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    base = name.split(":")[0].split("/")[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
    searched = data_dir if data_dir is not None else _default_data_dir()
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return UnknownDatasetError(
        f"{name!r} is not a registered TFDS dataset, and no prepared dataset of that name was "
        f"found in data_dir {searched!r}.{hint} See tfds.list_builders() for the registered names."
    )


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Integer images (uint8: [0, 255]; other ints: [0, iinfo.max]) and booleans to float32 in
    [-1, 1]; float features to float32 *as stored*.

    A float feature is taken to be data already in the model's coordinates -- e.g. SD-VAE
    latents scaled by 0.18215 in a TFDS dataset of one's own, roughly zero-mean, unit-std --
    and is not rescaled: there is no range to infer from a float dtype, and the sampler has no
    inverse to undo a guessed one. Float images in [0, 1] must be mapped to [-1, 1] when the
    dataset is prepared."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if np.issubdtype(images.dtype, np.integer):
        scale = np.float32(np.iinfo(images.dtype).max / 2.0)
        return (images.astype(np.float32) / scale - np.float32(1.0)).astype(np.float32)
    if images.dtype == np.bool_:
        return images.astype(np.float32) * 2.0 - 1.0
    return images.astype(np.float32)


def open_data_source(name: str, split: str = "train", data_dir: str | None = None):
    """``tfds.data_source(name, split=split, data_dir=data_dir, download=False)`` with clear
    :class:`DatasetNotFoundError` errors when the dataset is missing or unusable."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import registered

    data_dir = os.fspath(data_dir) if data_dir is not None else None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except registered.DatasetNotFoundError as e:
        raise _unknown_error(name, data_dir) from e
    except Exception as e:  # noqa: BLE001 -- diagnosed below, re-raised if not a missing dataset
        # tfds 4.9.10 with download=False reports a missing dataset inconsistently (KeyError on
        # empty splits, NotImplementedError about TFRECORD, FileNotFoundError, AssertionError):
        # ask the builder what is actually on disk.
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except registered.DatasetNotFoundError as e2:
            raise _unknown_error(name, data_dir) from e2
        except Exception:  # noqa: BLE001
            raise e from None
        if not builder.is_prepared():
            raise _not_prepared_error(name, data_dir, split, builder) from e
        fmt = builder.info.file_format
        if fmt is not None and getattr(fmt, "value", fmt) not in ("array_record", "parquet"):
            raise _wrong_format_error(name, builder, split) from e
        raise


DEFAULT_LABEL_KEY = "label"
"""The label feature read when present: a dataset without it is unlabelled (labels 0)."""


def check_features(name: str, features, image_key: str, label_key: str | None) -> bool:
    """Check ``image_key`` / ``label_key`` against a TFDS dataset's features; True if labels are read.

    A missing ``image_key`` is an error. ``label_key``: ``None`` or ``""`` reads no labels; the
    default :data:`DEFAULT_LABEL_KEY` is read when the dataset has it (unlabelled datasets need no
    setting); any other name must exist (a misspelt key is an error, not silently zero labels).
    When the features are unknown (no ``dataset_info``), the keys are trusted."""
    keys = sorted(features.keys()) if features is not None else None  # sorted: a stable message
    if keys is not None and image_key not in keys:
        raise KeyError(f"TFDS dataset {name!r} has no feature {image_key!r}; features: {keys}")
    if not label_key:
        return False
    if keys is None or label_key in keys:
        return True
    if label_key == DEFAULT_LABEL_KEY:
        return False
    raise KeyError(f"TFDS dataset {name!r} has no label feature {label_key!r}; features: {keys} "
                   "(set config.data.label_key to one of them, or to '' for an unlabelled dataset)")


def check_fixed_image_shape(name: str, features, image_key: str) -> None:
    """Refuse an image feature of varying size (declared shape with ``None``, e.g. ImageNet's
    ``(None, None, 3)``): batches are stacked as stored, so they would fail at the first batch."""
    if features is None:
        return
    shape = getattr(features[image_key], "shape", None)
    if shape is not None and any(d is None for d in tuple(shape)[:2]):
        raise ValueError(
            f"TFDS dataset {name!r}'s feature {image_key!r} has images of varying size (declared shape "
            f"{tuple(shape)}); the TFDS source trains on images as stored. Crop them to one size: "
            "train from an image folder (data.name='image_folder' centre-crops as ADM / DiT do), or "
            "encode them to latents with `jaxdiff encode` (which crops TFDS images) and train on those")


class TfdsSource:
    """Source over a prepared TFDS dataset split with batched random access.

    ``__getitem__(indices)`` returns ``{"image": float32 (n, H, W, C), "label": int32 (n,)}``:
    integer images mapped to [-1, 1], float features as stored (:func:`to_unit_range`). Labels:
    see :func:`check_features` (zeros for an unlabelled dataset, ``has_labels`` False); images of
    varying size are refused (:func:`check_fixed_image_shape`).
    """

    def __init__(
        self,
        name: str,
        split: str = "train",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str | None = "label",
    ):
        self.name = name
        self.split = split
        self.data_dir = data_dir
        self.image_key = image_key
        self.label_key = label_key
        self._source = open_data_source(name, split=split, data_dir=data_dir)
        self._len = len(self._source)
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        self.has_labels = check_features(name, features, image_key, label_key)
        # the label feature's class count (tfds ClassLabel), which the trainer checks the model against
        self.num_classes = (getattr(features[label_key], "num_classes", None)
                            if self.has_labels and features is not None else None)
        check_fixed_image_shape(name, features, image_key)
        self._batched_read = True

    @property
    def data_source(self):
        """The underlying ``tfds.data_source`` object."""
        return self._source

    def __len__(self) -> int:
        return self._len

    def _read(self, indices: list[int]) -> list[Any]:
        getitems = getattr(self._source, "__getitems__", None) if self._batched_read else None
        if getitems is not None:
            try:
                return list(getitems(indices))
            except TypeError:
                # tfds 4.9.10's tfds.testing.mock_data replaces the batched read with a function
                # missing an argument (TypeError: _getitems() missing ... 'record_keys'): read
                # record by record from then on (a genuine record error raises again below)
                self._batched_read = False
        return [self._source[i] for i in indices]

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        from jaxdiff.data.pipeline import flat_indices

        idx, flat = flat_indices(indices, self._len)
        records = self._read([int(i) for i in flat])
        if not records:
            raise ValueError("TfdsSource needs at least one index")
        images = np.stack([np.asarray(r[self.image_key]) for r in records])
        if images.ndim == 3:  # (n, H, W) grayscale without channel axis
            images = images[..., None]
        images = to_unit_range(images).reshape(idx.shape + images.shape[1:])
        if self.has_labels:
            labels = np.asarray([np.asarray(r[self.label_key]) for r in records])
            labels = labels.astype(np.int32).reshape(idx.shape)
        else:
            labels = np.zeros(idx.shape, np.int32)
        return {"image": images, "label": labels}

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={self._len})"
