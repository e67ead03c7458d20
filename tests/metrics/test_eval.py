"""Streamed evaluation (jaxdiff.eval) against an unstreamed computation of the same numbers.

A tiny digits UNet (random init: what is checked is the bookkeeping, not the model) is sampled
by :func:`evaluate_model` in batches of 16 (30 samples: a padded last batch) and, independently,
by :func:`jaxdiff.generate.generate` with the same key; the classifier features of the latter,
computed at once, give the reference statistics, Inception Score and class accuracy.
"""

import jax
import numpy as np
import pytest

from jaxdiff import eval as E
from jaxdiff.data import make_source
from jaxdiff.data.digits import load_digits
from jaxdiff.generate import class_labels, generate
from jaxdiff.metrics import digits_classifier as D
from jaxdiff.metrics import fid as M
from jaxdiff.modeling import build_model
from jaxdiff.train.loop import make_init_fn
from jaxdiff.train.state import make_optimizer
from tests.helpers import load_config


def test_evaluate_model_equals_unstreamed_statistics(tmp_path):
    config = load_config("digits", "tiny")
    model = build_model(config)
    params = jax.jit(make_init_fn(config, model, make_optimizer(config.optim)))(jax.random.PRNGKey(0)).params
    extractor = E.get_extractor("digits")
    key = jax.random.PRNGKey(5)
    got = E.evaluate_model(config, model, params, 30, key, sampler="ddim", num_steps=3, extractor=extractor,
                           batch_size=16, features_path=str(tmp_path / "f.npy"), splits=3, progress=False)
    images = generate(config, model, params, 30, key, sampler="ddim", num_steps=3, batch_size=16, progress=False)
    feats, logits = D.features_and_logits(images)
    mu, sigma = M.feature_statistics(feats)
    np.testing.assert_allclose(got["mu"], mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["sigma"], sigma, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "f.npy"), feats, rtol=1e-4, atol=1e-5)
    assert (got["inception_score"], got["inception_score_std"]) == pytest.approx(M.inception_score(logits, 3), rel=1e-4)
    assert got["class_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == class_labels(config, 30)))
    f_real, _ = D.features_and_logits(load_digits("test")[0])
    ref = {"mu": f_real.mean(0), "sigma": np.cov(f_real.astype(np.float64), rowvar=False), "features": f_real}
    scores = E.compare_to_reference(got, ref, kid_subsets=2, kid_subset_size=30)
    assert scores["fid"] == pytest.approx(M.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), rel=1e-4)
    assert (scores["precision"], scores["recall"]) == pytest.approx(M.precision_recall(f_real, feats), abs=1 / 30 + 1e-9)
    assert scores["kid"] > 0


def test_class_accuracy_only_from_logits_over_the_dataset_classes():
    """Inception's 1008 ImageNet logits say nothing about CIFAR / digits labels: an extractor whose
    logits are not the dataset's classes gives IS but no class_accuracy."""
    import dataclasses

    config = load_config("digits", "tiny")
    model = build_model(config)
    params = jax.jit(make_init_fn(config, model, make_optimizer(config.optim)))(jax.random.PRNGKey(0)).params
    digits = E.get_extractor("digits")
    assert digits.logits_are_labels and not E.FeatureExtractor("x", None, None, 1).logits_are_labels
    other = dataclasses.replace(digits, name="other", logits_are_labels=False)
    kw = dict(sampler="ddim", num_steps=2, batch_size=10, splits=2, progress=False)
    got = E.evaluate_model(config, model, params, 10, jax.random.PRNGKey(1), extractor=other, **kw)
    assert "inception_score" in got and "class_accuracy" not in got
    assert "class_accuracy" in E.evaluate_model(config, model, params, 10, jax.random.PRNGKey(1),
                                                extractor=digits, **kw)
    stats = E.dataset_statistics(make_source(config.data, "test"), other, batch_size=64, splits=2,
                                 progress=False)
    assert "class_accuracy" not in stats


def test_eval_file_names_carry_every_guidance_setting():
    tags = {E.guidance_tag(g) for g in (
        {"scale": 1.0, "interval": None, "rescale": 0.0},
        {"scale": 3.0, "interval": None, "rescale": 0.0},
        {"scale": 3.0, "interval": (0.3, 5.0), "rescale": 0.0},
        {"scale": 3.0, "interval": None, "rescale": 0.7},
        {"scale": 3.0, "interval": (0.3, 5.0), "rescale": 0.7},
        {"scale": 3.0, "interval": None, "rescale": 0.0, "channels": 3},
    )}
    assert tags == {"", "_cfg3", "_cfg3_interval0.3-5", "_cfg3_rescale0.7", "_cfg3_interval0.3-5_rescale0.7",
                    "_cfg3_ch3"}


def test_dataset_statistics_and_digits_score_on_real_digits():
    config = load_config("digits", "tiny")
    source = make_source(config.data, "test")
    stats = E.dataset_statistics(source, E.get_extractor("digits"), batch_size=64, splits=3, progress=False)
    x, y = load_digits("test")
    f, _ = D.features_and_logits(x)
    np.testing.assert_allclose(stats["mu"], f.mean(0), rtol=1e-5, atol=1e-6)
    assert stats["num"] == 180 and stats["class_accuracy"] > 0.95
    # held-out real digits, labelled 0..9 cyclically as generated samples are: a near-perfect "generator"
    order = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)]).reshape(10, 10).T.ravel()
    score = E.digits_score(config, x[order])
    assert score["digits_num"] == 100 and score["digits_accuracy"] > 0.95
    noise = np.random.default_rng(0).uniform(-1, 1, (100, 8, 8, 1)).astype(np.float32)
    assert E.digits_score(config, noise)["digits_fd"] > 10 * score["digits_fd"]
    assert E.digits_score(load_config("toy2d", "tiny"), noise) is None


def test_unknown_extractor_and_missing_reference():
    with pytest.raises(ValueError, match="valid: inception, digits"):
        E.get_extractor("clip")
    with pytest.raises(FileNotFoundError, match="jaxdiff stats"):
        M.load_stats("/nonexistent/stats.npz")


def test_cli_eval_without_inception_weights_says_what_to_do(tmp_path):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    env = {k: v for k, v in os.environ.items() if k != "JAXDIFF_INCEPTION_WEIGHTS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "jaxdiff.cli", "eval", f"--workdir={tmp_path}", "--num-samples=10",
                           f"--ref={tmp_path / 'ref.npz'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "JAXDIFF_INCEPTION_WEIGHTS" in proc.stderr and "python -m jaxdiff.metrics.inception" in proc.stderr
    assert "Traceback" not in proc.stderr
