"""Sample-quality metrics on feature vectors: FID, Inception Score, KID, precision and recall.

Everything here works on features (N, D) (Inception pool3, the digits classifier's penultimate
layer, ...) and logits, as numpy arrays, and computes in float64:

* :func:`frechet_distance` -- Heusel et al. 2017, "GANs trained by a two time-scale update rule
  converge to a local Nash equilibrium": ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``,
  computed as pytorch-fid's ``calculate_frechet_distance`` does (``scipy.linalg.sqrtm``, an
  ``eps * I`` offset when the product is singular, a complex result accepted only when its
  imaginary diagonal is below 1e-3).
* :class:`StatsAccumulator` -- mean and covariance of a stream of feature batches in float64
  (Chan et al. 1979 pairwise update), so memory does not grow with the number of samples;
  :func:`save_stats` / :func:`load_stats` -- the ``.npz`` layout of pytorch-fid and ADM
  (``mu``, ``sigma``; optionally ``features`` for KID and precision / recall).
* :func:`inception_score` -- Salimans et al. 2016, ``exp(E_x KL(p(y|x) || p(y)))`` over 10
  splits; :class:`InceptionScoreAccumulator` streams it.
* :func:`kernel_inception_distance` -- Binkowski et al. 2018, "Demystifying MMD GANs": unbiased
  MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3`` averaged over subsets.
* :func:`precision_recall` -- Kynkaanniemi et al. 2019, "Improved precision and recall metric
  for assessing generative models": k-NN (k = 3) balls around each real / generated feature.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

__all__ = [
    "frechet_distance", "feature_statistics", "StatsAccumulator", "save_stats", "load_stats",
    "inception_score", "InceptionScoreAccumulator", "kernel_inception_distance", "precision_recall",
]


# ------------------------------------------------------------------------------------------------
# Frechet distance and reference statistics
# ------------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    The computation of pytorch-fid 0.3.0 ``calculate_frechet_distance``, in float64: the matrix
    square root of ``sigma1 @ sigma2`` by ``scipy.linalg.sqrtm``; if it is not finite, both
    covariances get ``eps * I`` added and the root is taken again; a complex root is accepted
    (its real part kept) only if the imaginary part of its diagonal is within 1e-3 of zero.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match the means {mu1.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # pytorch-fid passes disp=False (deprecated in SciPy 1.16): no warning
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm of the covariance product has an imaginary component {m}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of features (N, D), float64; the covariance as ``np.cov(rowvar=False)``."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class StatsAccumulator:
    """Mean and covariance of feature batches (N_b, D), merged in float64 as they arrive.

    Chan, Golub & LeVeque 1979 pairwise update: for a running (n, mean, M2) and a batch
    (n_b, mean_b, M2_b), ``delta = mean_b - mean``, ``M2 += M2_b + delta delta^T n n_b / (n + n_b)``.
    Memory is O(D^2), independent of the number of features; the result equals
    :func:`feature_statistics` of the concatenated batches up to rounding.
    """

    def __init__(self):
        self.n = 0
        self.mean = None
        self.m2 = None

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        nb = f.shape[0]
        if nb == 0:
            return
        mb = f.mean(axis=0)
        c = f - mb
        m2b = c.T @ c
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma): the mean and the unbiased (N - 1) covariance."""
        if self.n < 2:
            raise ValueError(f"need at least 2 features for a covariance, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def save_stats(path: str, mu, sigma, features=None) -> str:
    """Writes ``mu``, ``sigma`` (and optionally ``features``) to ``path`` (.npz, no pickle).

    pytorch-fid (``--save-stats``) and ADM's evaluator read and write this layout.
    """
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)
    return path


def load_stats(path: str) -> dict[str, np.ndarray]:
    """``{"mu", "sigma"[, "features"]}`` from an .npz written by :func:`save_stats`, pytorch-fid
    or ADM (``allow_pickle=False``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"reference statistics {path!r} not found; compute them with `jaxdiff stats`")
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path} has arrays {sorted(z.files)}; reference statistics need 'mu' and 'sigma'")
        out = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
        if "features" in z:
            out["features"] = z["features"]
    return out


# ------------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------------

def _log_softmax(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


class InceptionScoreAccumulator:
    """Streams :func:`inception_score`: for each of ``splits`` contiguous chunks of the ``num``
    samples (chunk sizes as ``np.array_split``), accumulates ``sum_x p(y|x)`` and
    ``sum_x sum_y p log p``, since ``mean_x KL(p(y|x) || p(y)) = mean_x sum_y p log p - sum_y p(y) log p(y)``."""

    def __init__(self, num: int, splits: int = 10):
        if num < splits:
            raise ValueError(f"need at least {splits} samples for {splits} splits, got {num}")
        self.bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(num), splits)])
        self.splits, self.num, self.seen = splits, num, 0
        self.p_sum = None
        self.neg_ent = np.zeros(splits)

    def update(self, logits) -> None:
        logp = _log_softmax(logits)
        p = np.exp(logp)
        if self.p_sum is None:
            self.p_sum = np.zeros((self.splits, p.shape[1]))
        idx = self.seen + np.arange(p.shape[0])
        if idx[-1] >= self.num:
            raise ValueError(f"more than num={self.num} samples given")
        split = np.searchsorted(self.bounds, idx, side="right") - 1
        np.add.at(self.p_sum, split, p)
        np.add.at(self.neg_ent, split, (p * logp).sum(axis=1))
        self.seen += p.shape[0]

    def result(self) -> tuple[float, float]:
        if self.seen != self.num:
            raise ValueError(f"expected {self.num} samples, got {self.seen}")
        sizes = np.diff(self.bounds).astype(np.float64)
        py = self.p_sum / sizes[:, None]
        kl = self.neg_ent / sizes - (py * np.log(np.where(py > 0, py, 1.0))).sum(axis=1)
        scores = np.exp(kl)
        return float(scores.mean()), float(scores.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` of ``exp(mean_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016).

    ``logits`` (N, K): classifier logits (Inception's 1008 for the standard IS); the samples are
    split into contiguous chunks, as the original code and torch-fidelity do.
    """
    acc = InceptionScoreAccumulator(int(np.shape(logits)[0]), splits)
    acc.update(logits)
    return acc.result()


# ------------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ------------------------------------------------------------------------------------------------

def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = x.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 with kernel ``(x.y / d + 1)^3`` over random subsets.

    Binkowski et al. 2018 (the estimator of their ``polynomial_mmd_averages``): each of
    ``num_subsets`` draws ``subset_size`` rows of each set without replacement (the whole set if
    smaller); the diagonal terms of ``k(X, X)`` and ``k(Y, Y)`` are left out, so the estimate of
    identical distributions is 0 in expectation and may be negative.
    """
    a = np.asarray(features_a, np.float64)
    b = np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    m = min(int(subset_size), a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 features in each set")
    rng = np.random.default_rng(seed)
    vals = np.array([
        _mmd2_unbiased_poly(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
        for _ in range(int(num_subsets))
    ])
    return float(vals.mean()), float(vals.std())


# ------------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)
# ------------------------------------------------------------------------------------------------

def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest other row (index k after sorting,
    index 0 being the row itself)."""
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], block):
        d = _sq_dists(x[i:i + block], x)
        out[i:i + block] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(ref: np.ndarray, radii: np.ndarray, query: np.ndarray, block: int) -> float:
    inside = np.zeros(query.shape[0], bool)
    for i in range(0, query.shape[0], block):
        d = _sq_dists(query[i:i + block], ref)
        inside[i:i + block] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real_features, fake_features, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """(precision, recall) of Kynkaanniemi et al. 2019 (k-NN estimate of each manifold).

    The real manifold is the union of balls around every real feature with radius the distance
    to its k-th nearest real neighbour; precision is the fraction of generated features inside
    it. Recall swaps the roles. Distances in float64, computed ``block`` rows at a time (memory
    ``block * N``).
    """
    r = np.asarray(real_features, np.float64)
    f = np.asarray(fake_features, np.float64)
    if r.ndim != 2 or f.ndim != 2 or r.shape[1] != f.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {r.shape} and {f.shape}")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features in each set")
    precision = _coverage(r, _knn_radii(r, k, block), f, block)
    recall = _coverage(f, _knn_radii(f, k, block), r, block)
    return precision, recall

