"""FID, reference statistics, IS, KID and precision/recall against independent references:
pytorch-fid's ``calculate_frechet_distance``, numpy transcriptions of the papers' estimators, and
closed-form cases."""

import numpy as np
import pytest

from jaxdiff.metrics import fid as M
from tests.metrics import pytorch_fid_ref

_, FID_SCORE, WHY = pytorch_fid_ref.load()


def _feats(seed, n, d, shift=0.0, scale=1.0):
    """n draws of one correlated Gaussian per d (the mixing matrix depends on d only)."""
    mix = np.random.default_rng(d).standard_normal((d, d)) / np.sqrt(d)
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ mix * scale + shift).astype(np.float32)


@pytest.mark.skipif(FID_SCORE is None, reason=WHY or "")
@pytest.mark.parametrize("n,d", [(500, 64), (40, 64)])  # full-rank and singular (N < D) covariances
def test_frechet_distance_matches_pytorch_fid(n, d):
    a, b = _feats(0, n, d), _feats(1, n, d, shift=0.3, scale=1.2)
    mu1, s1 = M.feature_statistics(a)
    mu2, s2 = M.feature_statistics(b)
    # pytorch-fid's own statistics: np.mean(axis=0), np.cov(rowvar=False) of the float32 features
    ref = FID_SCORE.calculate_frechet_distance(np.mean(a, 0), np.cov(a, rowvar=False), np.mean(b, 0),
                                               np.cov(b, rowvar=False))
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got > 1.0
    assert abs(got - ref) <= 1e-6 * max(1.0, abs(ref))


def test_frechet_distance_closed_form_for_commuting_gaussians():
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(7), rng.standard_normal(7)
    v1, v2 = rng.uniform(0.5, 2, 7), rng.uniform(0.5, 2, 7)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    assert abs(M.frechet_distance(mu1, np.diag(v1), mu1, np.diag(v1))) < 1e-10


def test_stats_accumulator_equals_batch_statistics_and_npz_roundtrip(tmp_path):
    f = _feats(2, 1003, 16, shift=100.0)  # a large mean: the streaming update must stay accurate
    acc = M.StatsAccumulator()
    for i in range(0, 1003, 128):
        acc.update(f[i:i + 128])
    mu, sigma = acc.result()
    mu_ref, sigma_ref = M.feature_statistics(f)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-12)
    path = M.save_stats(str(tmp_path / "ref.npz"), mu, sigma, features=f)
    got = M.load_stats(path)
    np.testing.assert_array_equal(got["mu"], mu)
    np.testing.assert_array_equal(got["sigma"], sigma)
    np.testing.assert_array_equal(got["features"], f)
    with np.load(path, allow_pickle=False) as z:  # the pytorch-fid / ADM layout
        assert {"mu", "sigma"} <= set(z.files)
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        M.load_stats(str(tmp_path / "bad.npz"))


def _is_reference(logits, splits):
    """Salimans et al. 2016 / openai improved-gan ``get_inception_score``, on softmax(logits)."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = p / p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = part * (np.log(part) - np.log(py))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_matches_reference_and_streams():
    logits = np.random.default_rng(0).standard_normal((1005, 12)) * 3
    want = _is_reference(logits, 10)
    assert M.inception_score(logits) == pytest.approx(want, rel=1e-10)
    acc = M.InceptionScoreAccumulator(1005, 10)
    for i in range(0, 1005, 64):
        acc.update(logits[i:i + 64])
    assert acc.result() == pytest.approx(want, rel=1e-10)
    # closed form: confident predictions spread uniformly over K classes -> IS = K
    k = 10
    one_hot = np.where(np.eye(k)[np.arange(1000) % k] > 0, 50.0, -50.0)
    assert M.inception_score(one_hot)[0] == pytest.approx(k, rel=1e-6)


def _kid_reference(x, y):
    """Binkowski et al. 2018, unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops."""
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return sxx + syy - 2 * sxy


def test_kid_unbiased_polynomial_kernel():
    x, y = _feats(3, 30, 5).astype(np.float64), _feats(4, 30, 5, shift=0.5).astype(np.float64)
    got, std = M.kernel_inception_distance(x, y, num_subsets=3, subset_size=30)
    assert got == pytest.approx(_kid_reference(x, y), rel=1e-10) and std < 1e-12  # whole sets each time
    # same distribution: unbiased, so ~0 (within a few standard errors), not positive-biased
    a, b = _feats(5, 2000, 8), _feats(6, 2000, 8)
    mean, std = M.kernel_inception_distance(a, b, num_subsets=50, subset_size=200)
    assert abs(mean) < 4 * std / np.sqrt(50) + 1e-3
    far, _ = M.kernel_inception_distance(a, b + 1.0, num_subsets=5, subset_size=200)
    assert far > 100 * abs(mean)


def _pr_reference(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]

    def inside(ref, r, q):
        d = np.linalg.norm(q[:, None] - ref[None], axis=-1)
        return np.mean(np.any(d <= r[None], axis=1))

    return inside(real, radii(real), fake), inside(fake, radii(fake), real)


def test_precision_recall_kynkaanniemi():
    real, fake = _feats(7, 300, 4), _feats(8, 250, 4, shift=0.7, scale=0.6)
    p, r = M.precision_recall(real, fake, k=3, block=64)
    p_ref, r_ref = _pr_reference(real.astype(np.float64), fake.astype(np.float64), 3)
    assert (p, r) == pytest.approx((p_ref, r_ref), abs=1e-12)
    assert 0.05 < p < 0.95 and 0.05 < r < 0.95  # a case that is neither 0 nor 1
    assert M.precision_recall(real, real) == (1.0, 1.0)
    assert M.precision_recall(real, real + 100.0) == (0.0, 0.0)
