"""Reading full-size images for encoding into latents: an ImageFolder tree or a TFDS image
dataset, each image cropped square as ADM / DiT crop ImageNet.

* :func:`center_crop_arr` -- the preprocessing of ADM (Dhariwal & Nichol 2021,
  ``guided_diffusion/image_datasets.py``), which DiT's ``train.py`` (Peebles & Xie 2023) reuses:
  halve the image with a box filter while its short side is at least twice the target, resize
  bicubically so the short side equals the target, then crop the centre square.
* :class:`ImageFolderImages` -- ``root/<class>/**/<image>`` with torchvision ``ImageFolder``'s
  conventions (classes are the sorted sub-directory names, label = position in that list; files
  sorted, recursively, by the same extension list). DiT trains on ImageNet through
  ``ImageFolder``, so the labels match DiT's class indices.
* :class:`TfdsImages` -- a prepared TFDS dataset (``tfds.data_source``, e.g. ``imagenet2012``).

Each has ``len()``, ``read(i) -> (uint8 (H, W, 3), label)`` and ``describe() -> dict`` (what
the latent dataset's metadata records about its origin). Pillow does the decoding and resizing.

:class:`ImageFolderSource` is the training source over an ImageFolder tree in pixel space
(``config.data.name = "image_folder"``): each batch decoded and cropped on the fly.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["IMG_EXTENSIONS", "ImageFolderImages", "ImageFolderSource", "TfdsImages", "center_crop_arr",
           "image_folder_split", "to_rgb_uint8"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File extensions read by :class:`ImageFolderImages` (torchvision's list; compared lower-cased)."""


def to_rgb_image(image: Any):
    """A PIL image as an 8-bit RGB PIL image, as ``ImageFolder``'s loader (``convert("RGB")``)
    does, except for 16- and 32-bit integer grayscale (modes ``I;16*`` / ``I``, e.g. 16-bit PNGs),
    which Pillow's conversion clips at 255 (a 0..65535 ramp comes out almost white): those are
    scaled from 0..65535 to 0..255 first. Float images (mode ``F``) have no fixed range: refused.
    Always a new image (safe to keep after the file is closed)."""
    from PIL import Image

    if image.mode == "F":
        raise ValueError("float (mode 'F') images have no unambiguous range; convert them to 8- or 16-bit first")
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I" (int32)
        arr = np.asarray(image).astype(np.int64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr, "L")
    return image.convert("RGB")


def center_crop_arr(image: Any, image_size: int) -> np.ndarray:
    """ADM's centre crop of a PIL image (or an array) to ``(image_size, image_size, 3)`` uint8.

    1. While ``min(width, height) >= 2 * image_size``: resize to ``(width // 2, height // 2)`` with
       ``Image.BOX`` (an area average; cheap anti-aliasing before the bicubic step).
    2. Resize with ``Image.BICUBIC`` by ``image_size / min(width, height)``, each side rounded.
    3. Take the centre ``image_size`` square, offsets ``(side - image_size) // 2``.

    Images with another mode than RGB (grayscale, RGBA, palette) are converted first, as
    ``ImageFolder``'s loader does (``convert("RGB")``; 16-bit grayscale scaled to 8 bits:
    :func:`to_rgb_image`).
    """
    from PIL import Image

    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not isinstance(image, Image.Image):
        image = Image.fromarray(to_rgb_uint8(image))
    if image.mode != "RGB":
        image = to_rgb_image(image)
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def to_rgb_uint8(image: Any) -> np.ndarray:
    """An image array ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (uint8, or bool) as
    uint8 RGB; alpha is dropped, gray is repeated."""
    arr = np.asarray(image)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 image data, got {arr.dtype} (float images have no unambiguous range)")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W[, 1|3|4]) image, got shape {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


class ImageFolderImages:
    """Images under ``root/<class>/...`` in torchvision ``ImageFolder``'s order and labels.

    ``classes`` are the sorted names of ``root``'s sub-directories; the examples are, class by
    class, the files below each class directory (recursively, following links, directories and
    file names sorted) whose lower-cased name ends with one of :data:`IMG_EXTENSIONS`. (A class
    directory without images keeps its label; torchvision raises there instead.)
    """

    def __init__(self, root: str):
        root = os.path.expanduser(os.fspath(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        self.root = root
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"image folder {root!r} has no class sub-directories (expected root/<class>/<image>)")
        self.paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(self.classes):
            for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(IMG_EXTENSIONS):
                        self.paths.append(os.path.join(dirpath, fname))
                        labels.append(label)
        if not self.paths:
            raise FileNotFoundError(f"image folder {root!r} has no images with extensions {IMG_EXTENSIONS}")
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int):
        """``(PIL image, label)`` of example ``i`` (decoded lazily by the caller's crop)."""
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return to_rgb_image(im), int(self.labels[i])

    def describe(self) -> dict:
        import hashlib

        files = hashlib.sha256("\n".join(os.path.relpath(p, self.root) for p in self.paths).encode()).hexdigest()
        return {"kind": "image_folder", "root": os.path.abspath(self.root), "num_classes": len(self.classes),
                "classes": self.classes, "num_files": len(self.paths), "files_sha256": files}


class TfdsImages:
    """Images of a prepared TFDS dataset split (``tfds.data_source``, no TensorFlow needed).

    ``image_key`` names a uint8 image feature; ``label_key`` an integer one, with the rules of
    :func:`jaxdiff.data.tfds_source.check_features` (the default "label" is read when present,
    labels are 0 otherwise; another name must exist; ``None`` / ``""`` reads none)."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 image_key: str = "image", label_key: str | None = "label"):
        from jaxdiff.data.tfds_source import check_features, open_data_source

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.label_key = image_key, label_key
        self._source = open_data_source(name, split=split, data_dir=data_dir)
        features = getattr(getattr(self._source, "dataset_info", None), "features", None)
        self._has_label = check_features(name, features, image_key, label_key)
        self.num_classes = None
        if self._has_label and features is not None:
            self.num_classes = getattr(features[label_key], "num_classes", None)

    def __len__(self) -> int:
        return len(self._source)

    def read(self, i: int):
        record = self._source[int(i)]
        label = int(np.asarray(record[self.label_key])) if self._has_label else 0
        return to_rgb_uint8(record[self.image_key]), label

    def describe(self) -> dict:
        return {"kind": "tfds", "name": self.name, "split": self.split, "data_dir": self.data_dir,
                "image_key": self.image_key, "label_key": self.label_key if self._has_label else None,
                "num_classes": self.num_classes}


def image_folder_split(root: str, split: str = "train") -> str:
    """The folder of ``split``: ``<root>/<split>`` if it is a directory (ImageNet's ``train/`` and
    ``val/`` beside each other), else ``root`` itself for ``"train"``."""
    root = os.path.expanduser(os.fspath(root))
    sub = os.path.join(root, split)
    if os.path.isdir(sub):
        return sub
    if split == "train":
        return root
    raise FileNotFoundError(f"image folder {root!r} has no {split!r} sub-directory (expected {sub}/<class>/<image>)")


class ImageFolderSource:
    """Training source over an ImageFolder tree: ``source[indices]`` decodes the files, crops them
    with :func:`center_crop_arr` to ``image_size`` and returns ``{"image": float32 (n, S, S, C) in
    [-1, 1], "label": int32 (n,)}`` (``channels`` 3: RGB, 1: converted to luminance). A thread
    pool decodes a batch's files in parallel; random flips are the batch pipeline's
    (``config.data.flip``)."""

    def __init__(self, root: str, image_size: int, channels: int = 3, workers: int | None = None):
        if channels not in (1, 3):
            raise ValueError(f"an image folder gives 1 (gray) or 3 (RGB) channels, not {channels}")
        self.images = ImageFolderImages(root)
        self.image_size, self.channels = int(image_size), int(channels)
        self.workers = workers or min(16, os.cpu_count() or 1)
        self.num_classes = len(self.images.classes)
        self._pool = None

    def __len__(self) -> int:
        return len(self.images)

    def _load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.images.paths[i]) as im:
            arr = center_crop_arr(im, self.image_size)
        if self.channels == 1:
            arr = np.asarray(Image.fromarray(arr).convert("L"))[..., None]
        return arr

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        import concurrent.futures

        from jaxdiff.data.pipeline import flat_indices

        idx, flat = flat_indices(indices, len(self))
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers)
        arrs = list(self._pool.map(self._load, [int(i) for i in flat]))
        shape = idx.shape + (self.image_size, self.image_size, self.channels)
        images = (np.stack(arrs).astype(np.float32) / np.float32(127.5) - np.float32(1.0)).reshape(shape)
        return {"image": images, "label": self.images.labels[flat].reshape(idx.shape)}

    def __repr__(self) -> str:
        return f"ImageFolderSource(root={self.images.root!r}, n={len(self)}, image_size={self.image_size})"
