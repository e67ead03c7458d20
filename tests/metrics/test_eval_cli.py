"""`jaxdiff train` (digits score in the summary), `jaxdiff stats` and `jaxdiff eval` end to end on
a tiny digits run, with the digits classifier as the feature network (no Inception weights).

The streamed, batched evaluation is checked against an independent path: the same samples from
:func:`jaxdiff.generate.generate` (same seed, same batches), their classifier features computed
in one go, and the Frechet distance / accuracy of those.
"""

import json

import jax
import numpy as np
import pytest

from jaxdiff.data.digits import load_digits
from jaxdiff.metrics import digits_classifier as D
from jaxdiff.metrics import fid as M
from tests.helpers import run_python


pytestmark = pytest.mark.slow  # ~100 s of CPU (three processes); the fast checks are in test_eval.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    cache = root / "jax_cache"
    wd = root / "digits_tiny"
    proc = run_python(["-m", "jaxdiff.cli", "train", "--config=configs/digits.py:tiny", f"--workdir={wd}",
                       "--noprogress"], cache_dir=cache)
    return root, cache, wd, json.loads(proc.stdout)


def test_train_summary_reports_digits_score(run):
    _, _, _, summary = run
    assert summary["digits_num"] == 20  # configs/digits.py:tiny samples 20 at the end
    assert 0.0 <= summary["digits_accuracy"] <= 1.0
    assert summary["digits_fd"] > 0.0


def test_stats_then_eval_matches_unstreamed_computation(run):
    root, cache, wd, _ = run
    ref = root / "digits_test.npz"
    proc = run_python(["-m", "jaxdiff.cli", "stats", "--config=configs/digits.py:tiny", "--features=digits",
                       "--split=test", f"--out={ref}", "--save_features", "--noprogress", "--batch_size=64"],
                      cache_dir=cache)
    assert json.loads(proc.stdout)["num"] == 180
    stats = M.load_stats(str(ref))
    x_te, _ = load_digits("test")
    f_te, _ = D.features_and_logits(x_te)
    np.testing.assert_allclose(stats["mu"], f_te.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(f_te.astype(np.float64), rowvar=False), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["features"], f_te, rtol=1e-5, atol=1e-6)

    out = root / "eval.json"
    proc = run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--num-samples=30", "--features=digits",
                       f"--ref={ref}", "--batch_size=16", "--sampler=ddim", "--steps=3", f"--out={out}",
                       "--noprogress"], cache_dir=cache)
    result = json.loads(out.read_text())
    assert result["num_samples"] == 30 and result["sampler"] == "ddim" and result["steps"] == 3
    for k in ("fid", "inception_score", "class_accuracy", "kid", "precision", "recall"):
        assert k in result, k

    # independent path: generate the same 30 samples (same seed and batches), score them at once
    from jaxdiff.eval import restore_for_sampling
    from jaxdiff.generate import class_labels, generate

    config, model, params, _ = restore_for_sampling(str(wd))
    images = generate(config, model, params, 30, jax.random.PRNGKey(1), sampler="ddim", num_steps=3,
                      batch_size=16, progress=False)
    feats, logits = D.features_and_logits(images)
    want_fid = M.frechet_distance(*M.feature_statistics(feats), stats["mu"], stats["sigma"])
    assert result["fid"] == pytest.approx(want_fid, rel=1e-4)
    assert result["class_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == class_labels(config, 30)))
    assert (result["precision"], result["recall"]) == pytest.approx(M.precision_recall(f_te, feats), abs=1 / 30 + 1e-9)


def test_eval_with_guidance_flags_matches_generate_with_cfg(run):
    root, cache, wd, _ = run
    out = root / "eval_cfg.json"
    run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--num-samples=20", "--features=digits",
                "--batch_size=20", "--sampler=ddim", "--steps=3", f"--out={out}", "--guidance_scale=3",
                "--guidance_interval=0.3,5", "--noprogress"], cache_dir=cache)
    result = json.loads(out.read_text())
    assert result["guidance"] == {"scale": 3.0, "interval": [0.3, 5.0], "rescale": 0.0}

    from jaxdiff.eval import restore_for_sampling
    from jaxdiff.generate import class_labels, generate

    config, model, params, _ = restore_for_sampling(str(wd))
    images = generate(config, model, params, 20, jax.random.PRNGKey(1), sampler="ddim", num_steps=3, batch_size=20,
                      progress=False, guidance_override={"scale": 3.0, "interval": (0.3, 5.0), "rescale": 0.0})
    _, logits = D.features_and_logits(images)
    assert result["class_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == class_labels(config, 20)))


def test_eval_and_sample_with_a_ddpm_variance(run):
    root, cache, wd, _ = run
    out = root / "eval_large.json"
    run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--num-samples=20", "--features=digits",
                "--batch_size=20", "--sampler=ddpm", "--steps=4", "--variance=fixed_large", f"--out={out}",
                "--noprogress"], cache_dir=cache)
    result = json.loads(out.read_text())
    assert result["variance"] == "fixed_large"

    from jaxdiff.eval import restore_for_sampling
    from jaxdiff.generate import class_labels, generate

    config, model, params, _ = restore_for_sampling(str(wd))
    images = generate(config, model, params, 20, jax.random.PRNGKey(1), sampler="ddpm", num_steps=4, batch_size=20,
                      progress=False, variance="fixed_large")
    small = generate(config, model, params, 20, jax.random.PRNGKey(1), sampler="ddpm", num_steps=4, batch_size=20,
                     progress=False)
    feats, logits = D.features_and_logits(images)
    train_feats, _ = D.features_and_logits(load_digits("train")[0])
    ref = M.feature_statistics(train_feats)
    fid = M.frechet_distance(*M.feature_statistics(feats), *ref)
    fid_small = M.frechet_distance(*M.feature_statistics(D.features_and_logits(small)[0]), *ref)
    # the tiny model's samples are far from digits (FD ~7e7); fixed_small's differ by ~3e4, the
    # streamed evaluation from the direct one by float rounding only
    assert result["fid"] == pytest.approx(fid, rel=1e-4)
    gap = abs(fid_small - fid)  # sampled with fixed_large, not the default
    assert gap > 1e-4 * fid and gap > 100 * abs(result["fid"] - fid)
    assert result["class_accuracy"] == pytest.approx(np.mean(logits.argmax(1) == class_labels(config, 20)))
    proc = run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--num=4", "--sampler=ddpm", "--steps=3",
                       "--variance=fixed_large", "--noprogress"], cache_dir=cache)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["out"].endswith("ddpm_3_fixed_large.png") and summary["variance"] == "fixed_large"


def test_eval_cli_sweeps_samplers_and_steps(run):
    root, cache, wd, _ = run
    proc = run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--num-samples=10", "--features=digits",
                       "--batch_size=10", "--sampler=ddim,heun", "--steps=2,3", "--noprogress"], cache_dir=cache)
    sweep = json.loads(proc.stdout)
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in sweep["results"]] == [
        ("ddim", 2, 2), ("ddim", 3, 3), ("heun", 2, 3), ("heun", 3, 5)]
    assert "| heun | linspace | 3 | 5 |" in proc.stderr and open(sweep["table"]).read() in proc.stderr
    proc = run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--num=4", "--sampler=ddim", "--steps=3",
                       "--grid=trailing", "--noprogress"], cache_dir=cache)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["grid"] == "trailing" and summary["out"].endswith("ddim_3_trailing.png")
    with pytest.raises(AssertionError, match="one --sampler, one --steps and one --grid"):
        run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--steps=2,3", "--noprogress"], cache_dir=cache)
    with pytest.raises(AssertionError, match="one --guidance_scale"):
        run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--guidance_scale=1,3", "--noprogress"],
                   cache_dir=cache)
    proc = run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--num-samples=10", "--features=digits",
                       "--batch_size=10", "--sampler=ddim", "--steps=2", "--guidance_scale=1,3", "--noprogress"],
                      cache_dir=cache)
    assert [r["guidance"]["scale"] for r in json.loads(proc.stdout)["results"]] == [1.0, 3.0]
    with pytest.raises(AssertionError, match="unknown grid kind; valid: linspace"):
        run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--grid=nope", "--noprogress"], cache_dir=cache)
    with pytest.raises(AssertionError, match="expected comma-separated int"):
        run_python(["-m", "jaxdiff.cli", "eval", f"--workdir={wd}", "--features=digits", "--steps=two"],
                   cache_dir=cache)
