"""PF-ODE likelihood on Gaussian data, where everything is closed form.

Data N(mu, S) (D = 4, a full covariance, so the Jacobian is not diagonal and Rademacher probes
have non-zero variance). The exact denoiser in the VE frame y = x / alpha, s = sigma / alpha is
``x0_hat = mu + S (S + s^2 I)^-1 (y - mu)``, and y at noise level s is distributed as
N(mu, S + s^2 I). The flow map is affine, so the model's log-likelihood is closed form
(:func:`_model_closed_form`); it is the data density ``log N(x0; mu, S + s_lo^2 I)`` up to the
prior mismatch at s_hi (O(|mu| / s_hi), ~1e-2 here).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import processes as P
from jaxdiff.metrics import likelihood as L

D = 4
RNG = np.random.default_rng(0)
A = RNG.standard_normal((D, D)) * 0.4
S = A @ A.T + 0.05 * np.eye(D)
MU = RNG.standard_normal(D) * 0.3


def _denoiser(process):
    def denoise(x, t):
        a, s = process.alpha(t), process.sigma(t)
        r = s / a
        gain = jnp.asarray(S, jnp.float32) @ jnp.linalg.inv(jnp.asarray(S, jnp.float32) + r**2 * jnp.eye(D))
        mu = jnp.asarray(MU, jnp.float32)[None, :]
        return mu + (x / a - mu) @ gain.T
    return denoise


def _closed_form(x, s_lo):
    """log N(x; mu, S + s_lo^2 I): the data density at noise level s_lo."""
    c = S + s_lo**2 * np.eye(D)
    diff = x - MU
    quad = np.einsum("bi,ij,bj->b", diff, np.linalg.inv(c), diff)
    return -0.5 * quad - 0.5 * np.linalg.slogdet(c)[1] - 0.5 * D * math.log(2 * math.pi)


def _model_closed_form(x, s_lo, s_hi):
    """The PF-ODE model's exact log-likelihood: for Gaussian data the flow map from s_lo to s_hi is
    affine, y_hi = mu + M (y_lo - mu) with M = ((S + s_hi^2 I)(S + s_lo^2 I)^-1)^(1/2), and the
    prior is N(0, s_hi^2 I): log p = log N(y_hi; 0, s_hi^2 I) + log det M."""
    lam, q = np.linalg.eigh(S)
    m_diag = np.sqrt((lam + s_hi**2) / (lam + s_lo**2))
    y_hi = MU + (x - MU) @ (q * m_diag) @ q.T
    prior = -0.5 * np.sum(y_hi**2, 1) / s_hi**2 - D * (math.log(s_hi) + 0.5 * math.log(2 * math.pi))
    return prior + np.sum(np.log(m_diag))


def _data(n, seed):
    return (np.random.default_rng(seed).standard_normal((n, D)) @ np.linalg.cholesky(S).T + MU).astype(np.float32)


@pytest.mark.parametrize("process", [P.VPLinear(), P.EDM()], ids=["vp_linear", "edm"])
def test_exact_trace_matches_closed_form(process):
    x = _data(64, 1)
    s_lo, s_hi = L.sigma_ratio_range(process)
    f = jax.jit(lambda x: L.log_likelihood(_denoiser(process), process, x, num_steps=100, exact_trace=True)[0])
    got = np.asarray(f(jnp.asarray(x)))
    np.testing.assert_allclose(got, _model_closed_form(x, s_lo, s_hi), atol=5e-4)
    # and the model is the data density up to the prior mismatch at s_hi, O(|mu| / s_hi)
    np.testing.assert_allclose(got, _closed_form(x, s_lo), atol=0.05)


def test_hutchinson_is_unbiased_within_monte_carlo_error():
    process = P.VPLinear()
    n = 2048
    x = _data(n, 2)
    s_lo, s_hi = L.sigma_ratio_range(process)
    f = jax.jit(lambda x, k: L.log_likelihood(_denoiser(process), process, x, k, num_steps=50,
                                              probe="gaussian")[0])
    err = np.asarray(f(jnp.asarray(x), jax.random.key(0))) - _model_closed_form(x, s_lo, s_hi)
    se = err.std() / math.sqrt(n)
    assert err.std() > 1e-2  # the estimator has real variance here ...
    assert abs(err.mean()) < 4 * se + 2e-3  # ... and no bias beyond Monte-Carlo error


def test_bits_per_dim_is_dequantized_nll_plus_offset():
    process = P.VPLinear()
    levels = 17  # sklearn digits
    x = np.clip(np.round((_data(256, 3) + 1) * 8) / 8 - 1, -1, 1).astype(np.float32)
    key = jax.random.key(1)
    bpd = np.asarray(L.bits_per_dim(_denoiser(process), process, jnp.asarray(x), key, levels=levels,
                                    exact_trace=True, num_steps=100))
    y = np.asarray(L.dequantize(jax.random.split(key)[0], jnp.asarray(x), levels))
    assert np.all((y >= -1) & (y < 1)) and np.all(np.abs(y - x) <= 2.0 / levels)
    s_lo, s_hi = L.sigma_ratio_range(process)
    want = -_model_closed_form(y, s_lo, s_hi) / (D * math.log(2)) + math.log2(levels / 2)
    np.testing.assert_allclose(bpd, want, atol=1e-3)
