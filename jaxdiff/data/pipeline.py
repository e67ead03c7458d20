"""Deterministic, resumable, multi-process batch iteration over random-access sources.

A *source* is any object with ``__len__()`` and batched random access
``__getitem__(indices: np.ndarray) -> dict[str, np.ndarray]`` returning at least

* ``"image"``: float32 scaled to [-1, 1], shape ``(n, H, W, C)`` (images) or ``(n, D)`` (vectors);
* ``"label"``: int32, shape ``(n,)``.

Stream definition (what :func:`batch_iterator` yields) -- everything is a pure function of
``(seed, step, process_index, process_count)``, so resuming is exact:

* The example stream is the concatenation of epochs ``e = 0, 1, 2, ...``; epoch ``e`` is the
  permutation ``np.random.default_rng([seed, e]).permutation(len(source))`` (the identity when
  ``shuffle=False``). Epoch boundaries do not align with batches: a batch may straddle two epochs.
* Global step ``s`` covers stream positions ``[s * B, (s + 1) * B)`` with ``B = global_batch_size``.
* Process ``p`` of ``P`` takes the contiguous slice ``[p * B / P, (p + 1) * B / P)`` of that global
  batch, so the processes read disjoint examples that together form the global batch.
* Optional horizontal flips are drawn for the whole *global* batch from
  ``np.random.default_rng([seed, step, _FLIP_STREAM])`` and sliced like the indices, so an
  example's flip does not depend on the number of processes.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Source",
    "ArraySource",
    "BatchIterator",
    "batch_iterator",
    "flat_indices",
    "global_batch_indices",
    "random_flip",
]

# Distinguishes the flip RNG stream ([seed, step, _FLIP_STREAM]) from the epoch permutation
# stream ([seed, epoch]); the entropy lists have different lengths, so they never coincide.
_FLIP_STREAM = 0x666C6970  # "flip"


@runtime_checkable
class Source(Protocol):
    """Batched random-access data source protocol."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
    """In-memory source over ``images`` (n, ...) and ``labels`` (n,).

    ``images`` are stored as float32 (they must already be scaled to [-1, 1]); ``labels`` as int32
    (all zeros when ``labels is None``).
    """

    def __init__(self, images: Any, labels: Any = None):
        images = np.asarray(images, dtype=np.float32)
        if images.ndim < 2:
            raise ValueError(f"images must have shape (n, ...) with ndim >= 2, got {images.shape}")
        if labels is None:
            labels = np.zeros((images.shape[0],), np.int32)
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(
                f"labels must have shape ({images.shape[0]},) to match images {images.shape}, "
                f"got {labels.shape}"
            )
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        # the class count the trainer checks a class-conditional model against (labels 0..max)
        self.num_classes = int(self.labels.max()) + 1 if self.labels.size else 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, indices: Any) -> dict[str, np.ndarray]:
        idx = np.asarray(indices, dtype=np.int64)
        return {"image": self.images[idx], "label": self.labels[idx]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, image_shape={self.images.shape[1:]})"


def flat_indices(indices: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(idx, flat)``: ``indices`` as an int64 array and flattened into ``[0, n)`` (negative
    indices count from the end, as numpy's); IndexError outside ``[-n, n)``."""
    idx = np.asarray(indices, dtype=np.int64)
    flat = idx.reshape(-1)
    if flat.size and (flat.min() < -n or flat.max() >= n):
        raise IndexError(f"index out of range for {n} examples")
    return idx, np.where(flat < 0, flat + n, flat)


def _epoch_permutation(seed: int, epoch: int, n: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class _PermutationCache:
    """Keeps the few most recent epoch permutations (a batch touches at most a handful)."""

    def __init__(self, seed: int, n: int, shuffle: bool, capacity: int = 4):
        self.seed, self.n, self.shuffle, self.capacity = seed, n, shuffle, capacity
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, epoch: int) -> np.ndarray:
        perm = self._cache.get(epoch)
        if perm is None:
            perm = _epoch_permutation(self.seed, epoch, self.n, self.shuffle)
            if len(self._cache) >= self.capacity:
                del self._cache[min(self._cache)]
            self._cache[epoch] = perm
        return perm


def _positions_to_indices(positions: np.ndarray, perms: _PermutationCache) -> np.ndarray:
    n = perms.n
    epochs = positions // n
    offsets = positions % n
    out = np.empty_like(positions)
    for e in np.unique(epochs):
        mask = epochs == e
        out[mask] = perms(int(e))[offsets[mask]]
    return out


def global_batch_indices(
    n: int, global_batch_size: int, step: int, *, seed: int, shuffle: bool = True
) -> np.ndarray:
    """Source indices of the whole global batch at ``step`` (all processes, in order)."""
    positions = np.arange(step * global_batch_size, (step + 1) * global_batch_size, dtype=np.int64)
    return _positions_to_indices(positions, _PermutationCache(seed, n, shuffle))


def random_flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Horizontally flips ``images[i]`` (n, H, W, C) where ``flips[i]`` is True."""
    if images.ndim != 4:
        raise ValueError(f"random flip needs images of shape (n, H, W, C), got {images.shape}")
    return np.where(flips[:, None, None, None], images[:, :, ::-1, :], images)


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc


def _producer_loop(make_batch, start_step: int, q: queue.Queue, stop: threading.Event) -> None:
    # Must not reference the BatchIterator itself, so that an abandoned iterator is collectable.
    step = start_step
    while not stop.is_set():
        try:
            item: Any = make_batch(step)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
            item = _Failure(exc)
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, _Failure):
            return
        step += 1


class BatchIterator:
    """Infinite iterator of per-process batches; see :func:`batch_iterator`.

    ``step`` is the global step of the batch the next ``next()`` returns, i.e. the value to
    pass as ``start_step`` to resume right after the last batch consumed. Use as a context manager
    or call :meth:`close` to stop the prefetch thread.
    """

    def __init__(
        self,
        source: Any,
        global_batch_size: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
        shuffle: bool = True,
        flip: bool = False,
    ):
        if process_index is None or process_count is None:
            import jax  # lazy: keeps the data package importable without initialising jax

            if process_index is None:
                process_index = jax.process_index()
            if process_count is None:
                process_count = jax.process_count()
        global_batch_size = int(global_batch_size)
        process_count, process_index = int(process_count), int(process_index)
        if global_batch_size <= 0:
            raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(
                f"need 0 <= process_index < process_count, got {process_index} / {process_count}"
            )
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"process_count={process_count}"
            )
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if int(prefetch) < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        n = len(source)
        if n <= 0:
            raise ValueError("source is empty")

        self.source = source
        self.global_batch_size = global_batch_size
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = global_batch_size // process_count
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.flip = bool(flip)
        self.prefetch = int(prefetch)
        self.step = int(start_step)
        self._closed = False

        make_batch = _BatchMaker(
            source, n, global_batch_size, process_index, self.local_batch_size,
            self.seed, self.shuffle, self.flip,
        )
        self._make_batch = make_batch
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        if self.prefetch > 0:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=_producer_loop,
                args=(make_batch, self.step, self._queue, self._stop),
                name="jaxdiff-data-prefetch",
                daemon=True,
            )
            self._thread.start()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._closed:
            raise StopIteration
        if self._queue is None:
            try:
                batch = self._make_batch(self.step)
            except BaseException:
                self.close()
                raise
        else:
            item = self._queue.get()
            if isinstance(item, _Failure):
                self.close()
                raise item.exc
            batch = item
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the prefetch thread (idempotent). Further ``next()`` raises StopIteration."""
        if self._closed:
            return
        self._closed = True
        if self._stop is not None:
            self._stop.set()
            # Unblock a producer waiting on a full queue, then wait for it to exit.
            while self._thread is not None and self._thread.is_alive():
                try:
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass


class _BatchMaker:
    """Computes the batch of one process at a given global step (pure in ``step``)."""

    def __init__(self, source, n, global_batch_size, process_index, local_batch_size, seed,
                 shuffle, flip):
        self.source = source
        self.global_batch_size = global_batch_size
        self.local_batch_size = local_batch_size
        self.process_index = process_index
        self.seed = seed
        self.flip = flip
        self.perms = _PermutationCache(seed, n, shuffle)

    def indices(self, step: int) -> np.ndarray:
        start = step * self.global_batch_size + self.process_index * self.local_batch_size
        positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
        return _positions_to_indices(positions, self.perms)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices(step)
        raw = self.source[idx]
        if not isinstance(raw, Mapping):
            raise TypeError(f"source[indices] must return a mapping, got {type(raw).__name__}")
        batch = {k: np.asarray(v) for k, v in raw.items()}
        for k, v in batch.items():
            if v.shape[:1] != (self.local_batch_size,):
                raise ValueError(
                    f"source returned {k!r} with leading dim {v.shape[:1]}, expected "
                    f"{self.local_batch_size}"
                )
        if self.flip:
            flips = np.random.default_rng([self.seed, step, _FLIP_STREAM]).random(
                self.global_batch_size) < 0.5
            lo = self.process_index * self.local_batch_size
            batch["image"] = random_flip(batch["image"], flips[lo:lo + self.local_batch_size])
        return batch


def batch_iterator(
    source: Any,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch: int = 2,
    shuffle: bool = True,
    flip: bool = False,
    augment: str | None = None,
) -> BatchIterator:
    """Infinite, deterministic iterator of this process's batches (see the module docstring).

    Args:
      source: a source (``len`` + batched ``__getitem__``).
      global_batch_size: examples per step across all processes; must be divisible by
        ``process_count``. Each yielded batch has leading dim
        ``global_batch_size // process_count``.
      seed: shuffling (and flip) seed.
      start_step: first global step to yield; batch ``k`` of an iterator started at ``s`` equals
        batch ``s + k`` of one started at 0. Skipped steps are not computed.
      process_index, process_count: default to ``jax.process_index()`` / ``jax.process_count()``.
      prefetch: number of batches prepared ahead in a background daemon thread (0: synchronous).
        Exceptions raised while preparing a batch are re-raised by ``next()``.
      shuffle: if False, every epoch is the identity order.
      flip: random horizontal flip with probability 1/2 per example (images only).
      augment: ``None`` or ``"flip"`` (same as ``flip=True``).

    Returns:
      A :class:`BatchIterator` (an iterator and context manager with ``close()`` and ``step``).
    """
    if augment not in (None, "none", "flip"):
        raise ValueError(f"unknown augment {augment!r}; valid: None, 'flip'")
    return BatchIterator(
        source,
        global_batch_size,
        seed=seed,
        start_step=start_step,
        process_index=process_index,
        process_count=process_count,
        prefetch=prefetch,
        shuffle=shuffle,
        flip=bool(flip) or augment == "flip",
    )
