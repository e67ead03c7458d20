"""Latent datasets: the encoder posteriors of a VAE over an image dataset, stored as ``.npy``
files, and the source that trains on them (``config.data.name = "latents"``).

Latent diffusion models (Rombach et al. 2022; DiT, Peebles & Xie 2023) train on
``z = scaling_factor * draw from q(z | x)``. DiT's ``train.py`` encodes every batch again and
draws a fresh ``z`` each step; its images are centre-cropped (ADM's crop) and flipped at random.
A latent dataset made by ``jaxdiff encode`` (:mod:`jaxdiff.encode`) keeps that training
distribution while the encoder runs once: for every image it stores the posterior mean and
standard deviation (both already multiplied by the scaling factor) of the image and of its mirror
image, and :class:`LatentSource` hands the training step the mean and std of one view, from which
the step draws ``z = mean + std * noise`` with its own key (:func:`jaxdiff.train.step.make_train_step`).

On disk, one directory per split, ``<root>/<split>/``:

* ``meta.json``: ``format`` = ``"jaxdiff-latents"``, ``version``, ``num_images`` (N),
  ``views`` (``["image"]`` or ``["image", "hflip"]``), ``latent_shape`` ``[h, w, C]``, ``dtype``,
  ``scaling_factor``, ``num_done`` (images written so far; an interrupted ``encode`` resumes from
  there), ``settings`` (what was encoded and how: VAE, source, crop, image size);
* ``mean.npy``: ``(N, V, h, w, C)`` in ``dtype`` (float32 or float16); ``std.npy``: the same
  shape in float32; ``label.npy``: ``(N,)`` int32.

Example ``j`` of the source (``0 <= j < N * V``) is view ``j // N`` of image ``j % N``: an epoch
sees every image once as it is and, with flips stored, once mirrored.

This module reads and writes numpy files only; the encoder is in :mod:`jaxdiff.encode`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = ["FORMAT", "VERSION", "LatentSource", "LatentWriter", "POSTERIORS", "read_meta"]

FORMAT = "jaxdiff-latents"
VERSION = 1
POSTERIORS = ("sample", "mean")
"""``config.data.latent_posterior``: ``"sample"`` (train on draws from the posterior, as DiT) or
``"mean"`` (train on the posterior mean)."""

def _split_dir(root: str, split: str) -> str:
    return os.path.join(os.path.expanduser(os.fspath(root)), split)


def read_meta(root: str, split: str = "train") -> dict:
    """The ``meta.json`` of ``<root>/<split>``, with clear errors for a missing or foreign directory."""
    d = _split_dir(root, split)
    path = os.path.join(d, "meta.json")
    if not os.path.exists(path):
        root_abs = os.path.abspath(os.path.expanduser(os.fspath(root)))
        have = sorted(s for s in os.listdir(root_abs) if os.path.exists(os.path.join(root_abs, s, "meta.json"))) \
            if os.path.isdir(root_abs) else []
        hint = (f"it has the splits {have}" if have else
                "make one with `jaxdiff encode --vae VAE_DIR --image_folder IMAGES (or --tfds NAME) --out ROOT`")
        raise FileNotFoundError(f"no latent dataset split {split!r} under {root_abs!r} ({path} is missing); {hint}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a jaxdiff latent dataset (format {meta.get('format')!r})")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this jaxdiff reads up to {VERSION}")
    return meta


class LatentSource:
    """Batched random-access source over a latent dataset split (see the module docstring).

    ``__getitem__(indices)`` returns ``{"image": mean, "label": label}`` and, with
    ``posterior="sample"``, ``"image_std"``: the training step then trains on
    ``image + image_std * noise``. Arrays are memory-mapped; reading a batch touches only its rows.
    """

    def __init__(self, root: str, split: str = "train", posterior: str = "sample"):
        if posterior not in POSTERIORS:
            raise ValueError(f"unknown latent posterior {posterior!r}; valid: {', '.join(POSTERIORS)}")
        self.root, self.split, self.posterior = root, split, posterior
        self.meta = read_meta(root, split)
        n, done = int(self.meta["num_images"]), int(self.meta["num_done"])
        d = _split_dir(root, split)
        if done < n:
            raise ValueError(
                f"latent dataset {d!r} is incomplete: {done} of {n} images encoded. Run the same `jaxdiff encode` "
                "command again to finish it (it resumes where it stopped)")
        self._mean = np.load(os.path.join(d, "mean.npy"), mmap_mode="r")
        self._std = np.load(os.path.join(d, "std.npy"), mmap_mode="r") if posterior == "sample" else None
        self._label = np.load(os.path.join(d, "label.npy"))
        self.num_images = n
        self.num_views = len(self.meta["views"])
        want = (n, self.num_views, *self.meta["latent_shape"])
        if self._mean.shape != want or self._label.shape != (n,):
            raise ValueError(f"latent dataset {d!r}: mean.npy {self._mean.shape} / label.npy {self._label.shape} "
                             f"do not match meta.json ({want})")
        self.scaling_factor = float(self.meta["scaling_factor"])
        source = (self.meta.get("settings") or {}).get("source", {})
        declared = source.get("num_classes")
        self.num_classes = int(declared) if declared else int(self._label.max()) + 1 if n else 0
        """Classes of the source dataset (its declared count, else the largest label + 1)."""
        self.has_labels = not (source.get("kind") == "tfds" and source.get("label_key") is None)
        """False for latents of an unlabelled TFDS dataset (their labels are all 0)."""

    def __len__(self) -> int:
        return self.num_images * self.num_views

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        from jaxdiff.data.pipeline import flat_indices

        idx, flat = flat_indices(indices, len(self))
        image, view = flat % self.num_images, flat // self.num_images
        shape = idx.shape + tuple(self.meta["latent_shape"])
        out = {"image": np.asarray(self._mean[image, view], np.float32).reshape(shape),
               "label": self._label[image].astype(np.int32).reshape(idx.shape)}
        if self._std is not None:
            out["image_std"] = np.asarray(self._std[image, view], np.float32).reshape(shape)
        return out

    def __repr__(self) -> str:
        return (f"LatentSource(root={self.root!r}, split={self.split!r}, images={self.num_images}, "
                f"views={self.meta['views']}, posterior={self.posterior!r})")


class LatentWriter:
    """Writes a latent dataset split in order, resumably (used by :func:`jaxdiff.encode.encode_images`).

    ``LatentWriter(root, split, settings, num_images, views, latent_shape, dtype, scaling_factor)``
    creates the files, or reopens them when ``meta.json`` exists with the same ``settings``,
    shape and dtype (``num_done`` then says where to continue). ``write(start, mean, std, label)``
    fills rows ``start:start + len(label)``; ``commit(num_done)`` flushes the arrays and then
    rewrites ``meta.json`` atomically (fsynced), so ``num_done`` never counts rows that are not on
    disk. The writer holds an exclusive lock on the directory (``.lock``, ``fcntl.flock``) until
    :meth:`close`: a second writer of the same split is refused.
    """

    def __init__(self, root: str, split: str, settings: dict, num_images: int, views: list[str],
                 latent_shape: tuple[int, ...], dtype: str, scaling_factor: float):
        self.dir = _split_dir(root, split)
        self.meta = {"format": FORMAT, "version": VERSION, "num_images": int(num_images), "views": list(views),
                     "latent_shape": [int(s) for s in latent_shape], "dtype": str(np.dtype(dtype)),
                     "scaling_factor": float(scaling_factor), "num_done": 0, "settings": settings}
        shape = (int(num_images), len(views), *self.meta["latent_shape"])
        meta_path = os.path.join(self.dir, "meta.json")
        os.makedirs(self.dir, exist_ok=True)
        self._lock = _lock(os.path.join(self.dir, ".lock"))
        if os.path.exists(meta_path):
            old = read_meta(root, split)
            mismatched = [k for k in ("num_images", "views", "latent_shape", "dtype", "scaling_factor", "settings")
                          if _jsonable(old.get(k)) != _jsonable(self.meta[k])]
            if mismatched:
                self.close()
                diff = "; ".join(f"{k}: {old.get(k)!r} on disk vs {self.meta[k]!r} now" for k in mismatched)
                raise ValueError(f"{self.dir!r} holds a latent dataset made with other settings ({diff}); "
                                 "pass another --out (or --split), or delete it to start over")
            self.meta["num_done"] = int(old["num_done"])
            mode = "r+"
        else:
            mode = "w+"
        self._mean = np.lib.format.open_memmap(os.path.join(self.dir, "mean.npy"), mode=mode, dtype=dtype, shape=shape)
        self._std = np.lib.format.open_memmap(os.path.join(self.dir, "std.npy"), mode=mode, dtype=np.float32,
                                               shape=shape)
        self._label = np.lib.format.open_memmap(os.path.join(self.dir, "label.npy"), mode=mode, dtype=np.int32,
                                                shape=shape[:1])
        for name, arr in (("mean", self._mean), ("std", self._std), ("label", self._label)):
            want = shape if name != "label" else shape[:1]
            if arr.shape != want:
                raise ValueError(f"{self.dir}/{name}.npy has shape {arr.shape}, expected {want}")
        if mode == "w+":
            self.commit(0)

    @property
    def num_done(self) -> int:
        return int(self.meta["num_done"])

    def write(self, start: int, mean: np.ndarray, std: np.ndarray, label: np.ndarray) -> None:
        stop = start + len(label)
        self._mean[start:stop] = mean
        self._std[start:stop] = std
        self._label[start:stop] = label

    def commit(self, num_done: int) -> None:
        for arr in (self._mean, self._std, self._label):
            arr.flush()
        self.meta["num_done"] = int(num_done)
        tmp = os.path.join(self.dir, "meta.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, "meta.json"))
        _fsync_dir(self.dir)

    def close(self) -> None:
        """Releases the directory's lock (the memory maps close with the object)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _lock(path: str):
    """An exclusive, non-blocking ``flock`` on ``path`` (released when the file is closed)."""
    import fcntl

    f = open(path, "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"another process is writing {os.path.dirname(path)!r} (it holds {path}); "
                         "wait for it, or write to another --out") from None
    return f


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _jsonable(x):
    """``x`` as it reads back from JSON (tuples become lists), for comparing settings."""
    return json.loads(json.dumps(x))
