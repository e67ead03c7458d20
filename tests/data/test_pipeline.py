"""Tests for jaxdiff.data.pipeline: ArraySource and the deterministic batch iterator."""

import itertools
import threading

import numpy as np
import pytest

from jaxdiff.data import ArraySource, batch_iterator, global_batch_indices, make_source
from jaxdiff.data.pipeline import BatchIterator


def _index_source(n, image_shape=(4, 4, 1)):
    """Source whose label is the example index and whose image encodes it too."""
    images = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1,) + image_shape,
                                                                            np.float32)
    images = images + np.linspace(0.0, 0.5, image_shape[1], dtype=np.float32)[None, None, :, None]
    return ArraySource(images / n, np.arange(n))


def _take(it, k):
    with it:
        return [next(it) for _ in range(k)]


def _labels(batches):
    return np.concatenate([b["label"] for b in batches])


def test_array_source_getitem_and_validation():
    src = ArraySource(np.zeros((5, 3)), np.arange(5))
    out = src[np.array([4, 0, 4])]
    assert out["image"].dtype == np.float32 and out["image"].shape == (3, 3)
    assert out["label"].dtype == np.int32
    np.testing.assert_array_equal(out["label"], [4, 0, 4])
    assert len(src) == 5
    np.testing.assert_array_equal(ArraySource(np.zeros((3, 2)))[np.arange(3)]["label"], 0)
    with pytest.raises(ValueError):
        ArraySource(np.zeros((5, 3)), np.arange(4))


def test_batch_shapes_and_dtypes():
    src = _index_source(20)
    batches = _take(batch_iterator(src, 8, seed=0, process_index=0, process_count=1), 3)
    for b in batches:
        assert b["image"].shape == (8, 4, 4, 1) and b["image"].dtype == np.float32
        assert b["label"].shape == (8,) and b["label"].dtype == np.int32


def test_deterministic_and_seed_dependent():
    src = _index_source(50)
    kw = dict(process_index=0, process_count=1)
    a = _take(batch_iterator(src, 10, seed=3, **kw), 12)
    b = _take(batch_iterator(src, 10, seed=3, **kw), 12)
    c = _take(batch_iterator(src, 10, seed=4, **kw), 12)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(_labels(a), _labels(c))


@pytest.mark.parametrize("n,batch", [(50, 10), (37, 8), (5, 16)])
def test_epochs_are_seeded_permutations(n, batch):
    """Stream = concatenation of default_rng([seed, e]).permutation(n); each epoch covers all."""
    seed = 11
    steps = max(2, -(-3 * n // batch))  # at least 3 epochs and 2 steps
    stream = _labels(_take(batch_iterator(_index_source(n), batch, seed=seed, process_index=0,
                                          process_count=1), steps))
    for e in range(3):
        epoch = stream[e * n:(e + 1) * n]
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))  # every index exactly once
        np.testing.assert_array_equal(epoch, np.random.default_rng([seed, e]).permutation(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # epochs are reshuffled
    np.testing.assert_array_equal(
        global_batch_indices(n, batch, 1, seed=seed), stream[batch:2 * batch])


def test_no_shuffle_is_identity_order():
    stream = _labels(_take(batch_iterator(_index_source(7), 3, seed=0, shuffle=False,
                                          process_index=0, process_count=1), 5))
    np.testing.assert_array_equal(stream, np.arange(15) % 7)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_equals_tail_of_fresh_iterator(prefetch):
    src = _index_source(23)
    kw = dict(seed=5, process_index=0, process_count=1, prefetch=prefetch, flip=True)
    fresh = _take(batch_iterator(src, 6, **kw), 15)
    it = batch_iterator(src, 6, start_step=9, **kw)
    assert it.step == 9
    resumed = _take(it, 6)
    assert it.step == 15
    for x, y in zip(resumed, fresh[9:]):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_resume_does_not_iterate_skipped_steps():
    calls = []

    class Counting(ArraySource):
        def __getitem__(self, indices):
            calls.append(1)
            return super().__getitem__(indices)

    src = Counting(np.zeros((10, 2)), np.arange(10))
    it = batch_iterator(src, 4, seed=0, start_step=10**9, process_index=0, process_count=1,
                        prefetch=0)
    batch = next(it)
    assert len(calls) == 1
    np.testing.assert_array_equal(
        batch["label"], global_batch_indices(10, 4, 10**9, seed=0))


@pytest.mark.parametrize("count", [2, 4])
def test_processes_get_disjoint_slices_of_global_batch(count):
    src = _index_source(30)
    single = _take(batch_iterator(src, 8, seed=1, process_index=0, process_count=1, flip=True), 6)
    per_proc = [
        _take(batch_iterator(src, 8, seed=1, process_index=p, process_count=count, flip=True), 6)
        for p in range(count)
    ]
    for step in range(6):
        parts = [per_proc[p][step] for p in range(count)]
        for part in parts:
            assert part["label"].shape == (8 // count,)
        labels = [set(part["label"].tolist()) for part in parts]
        for i, j in itertools.combinations(range(count), 2):
            assert not labels[i] & labels[j]
        np.testing.assert_array_equal(
            np.concatenate([part["label"] for part in parts]), single[step]["label"])
        # Flips are drawn per global batch, so they agree with the single-process run.
        np.testing.assert_array_equal(
            np.concatenate([part["image"] for part in parts]), single[step]["image"])


def test_indivisible_batch_and_bad_args_raise():
    src = _index_source(10)
    with pytest.raises(ValueError, match="divisible"):
        batch_iterator(src, 9, seed=0, process_index=0, process_count=2)
    with pytest.raises(ValueError):
        batch_iterator(src, 8, seed=0, process_index=2, process_count=2)
    with pytest.raises(ValueError):
        batch_iterator(src, 8, seed=0, augment="rotate")
    with pytest.raises(ValueError):
        batch_iterator(ArraySource(np.zeros((0, 2))), 8, seed=0, process_index=0,
                       process_count=1)


def test_process_defaults_come_from_jax():
    it = batch_iterator(_index_source(10), 4, seed=0, prefetch=0)
    assert (it.process_index, it.process_count) == (0, 1)
    assert next(it)["label"].shape == (4,)


def test_prefetch_matches_synchronous():
    src = _index_source(31)
    sync = _take(batch_iterator(src, 7, seed=2, prefetch=0, process_index=0, process_count=1), 10)
    for prefetch in (1, 3):
        pre = _take(batch_iterator(src, 7, seed=2, prefetch=prefetch, process_index=0,
                                   process_count=1), 10)
        for x, y in zip(sync, pre):
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])


class _Boom(RuntimeError):
    pass


class _FailingSource(ArraySource):
    def __init__(self, fail_on_call):
        super().__init__(np.zeros((20, 2)), np.arange(20))
        self.fail_on_call = fail_on_call
        self.calls = 0

    def __getitem__(self, indices):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise _Boom("source exploded")
        return super().__getitem__(indices)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_exceptions_propagate_to_consumer(prefetch):
    it = batch_iterator(_FailingSource(3), 4, seed=0, prefetch=prefetch, process_index=0,
                        process_count=1)
    next(it)
    next(it)
    with pytest.raises(_Boom, match="source exploded"):
        next(it)
    assert it.step == 2
    if it._thread is not None:
        it._thread.join(timeout=5)
        assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


def test_close_stops_prefetch_thread():
    before = threading.active_count()
    it = batch_iterator(_index_source(10), 2, seed=0, prefetch=2, process_index=0,
                        process_count=1)
    assert isinstance(it, BatchIterator)
    next(it)
    assert it._thread.is_alive() and it._thread.daemon
    it.close()
    assert not it._thread.is_alive()
    it.close()  # idempotent
    with pytest.raises(StopIteration):
        next(it)
    with batch_iterator(_index_source(10), 2, seed=0, process_index=0, process_count=1) as it2:
        next(it2)
    assert not it2._thread.is_alive()
    assert threading.active_count() <= before


def test_random_flip_flips_about_half_deterministically():
    src = _index_source(64, image_shape=(3, 5, 2))
    kw = dict(seed=7, process_index=0, process_count=1, shuffle=False)
    plain = _take(batch_iterator(src, 64, **kw), 2)
    flipped = _take(batch_iterator(src, 64, augment="flip", **kw), 2)
    again = _take(batch_iterator(src, 64, flip=True, **kw), 2)
    for p, f, g in zip(plain, flipped, again):
        np.testing.assert_array_equal(f["image"], g["image"])
        np.testing.assert_array_equal(f["label"], p["label"])
        is_flipped = np.array([np.array_equal(fi, pi[:, ::-1]) for fi, pi in
                               zip(f["image"], p["image"])])
        is_same = np.array([np.array_equal(fi, pi) for fi, pi in zip(f["image"], p["image"])])
        assert np.all(is_flipped ^ is_same)  # each example is either flipped or untouched
        assert 16 < is_flipped.sum() < 48
    # Different steps draw different flips.
    f0 = [np.array_equal(a, b) for a, b in zip(flipped[0]["image"], plain[0]["image"])]
    f1 = [np.array_equal(a, b) for a, b in zip(flipped[1]["image"], plain[1]["image"])]
    assert f0 != f1


def test_flip_on_vectors_raises():
    it = batch_iterator(ArraySource(np.zeros((8, 2))), 4, seed=0, flip=True, prefetch=0,
                        process_index=0, process_count=1)
    with pytest.raises(ValueError, match="flip"):
        next(it)


def test_make_source_dispatch_and_errors():
    src = make_source({"name": "toy2d", "toy": "checkerboard", "num_points": 128, "seed": 1})
    assert len(src) == 128 and src[np.arange(3)]["image"].shape == (3, 2)
    assert len(make_source({"name": "digits"}, split="test")) + len(
        make_source({"name": "digits"})) == 1797
    with pytest.raises(ValueError, match="digits.*toy2d.*tfds"):
        make_source({"name": "imagenet"})
    try:
        import ml_collections
    except ImportError:
        return
    cfg = ml_collections.ConfigDict({"name": "toy2d", "toy": "gmm8", "num_points": 64, "seed": 0})
    assert len(make_source(cfg)) == 64
