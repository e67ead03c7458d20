"""Checkpoints outlive the device count and the workdir's config.json.

* A run trained on 2 (host-platform) devices samples on 1: ``jaxdiff sample`` and
  :func:`jaxdiff.eval.restore_for_sampling` restore onto this process's devices, with the
  config saved in the checkpoint; the params equal those a 2-device process restores.
* A resume that fails its data check leaves ``workdir/config.json`` as it was.
* Resuming past ``train.num_steps`` is an error that says what to do.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_python

CFG = "configs/digits.py:tiny"
TWO = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

RESTORE = r"""
import json, sys
import jax, numpy as np
from jaxdiff.eval import restore_for_sampling
config, model, params, step = restore_for_sampling(sys.argv[1])
leaves = jax.tree_util.tree_leaves_with_path(params)
print(json.dumps({"devices": jax.device_count(), "step": step,
                  "sums": {jax.tree_util.keystr(k): float(np.asarray(v, np.float64).sum()) for k, v in leaves}}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("restore_devices")
    wd = root / "wd"
    run_python(["-m", "jaxdiff.cli", "train", f"--config={CFG}", f"--workdir={wd}",
                "--config.sample.num=0", "--noprogress"], cache_dir=root / "cache", env_extra=TWO)
    proc = run_python(["-c", RESTORE, str(wd)], cache_dir=root / "cache", env_extra=TWO)
    return root, wd, json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_device_checkpoint_restores_on_one_device(run):
    from jaxdiff.eval import restore_for_sampling

    _, wd, two = run
    assert two["devices"] == 2 and two["step"] == 6
    assert jax.device_count() == 1
    config, _, params, step = restore_for_sampling(str(wd))
    assert step == 6 and config.data.name == "digits"
    got = {jax.tree_util.keystr(k): float(np.asarray(v, np.float64).sum())
           for k, v in jax.tree_util.tree_leaves_with_path(params)}
    assert got.keys() == two["sums"].keys()
    assert got == two["sums"]  # the same stored values, whatever the layout they are read into


def test_sample_cli_on_one_device(run):
    root, wd, _ = run
    out = root / "grid.png"
    proc = run_python(["-m", "jaxdiff.cli", "sample", f"--workdir={wd}", "--sampler=ddim", "--steps=3",
                       "--num=4", f"--out={out}", "--noprogress"], cache_dir=root / "cache")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["checkpoint_step"] == 6 and summary["num"] == 4
    assert Image.open(out).size[0] > 8


def test_failed_resume_keeps_config_json_and_sampling_uses_the_checkpoint_config(run, tmp_path):
    import shutil

    from jaxdiff.eval import restore_for_sampling

    root, wd, _ = run
    wd2 = tmp_path / "wd2"
    shutil.copytree(wd, wd2)
    before = (wd2 / "config.json").read_text()
    # 16x16 images from an 8x8 dataset: fails the data-shape check after the checkpoint restored
    with pytest.raises(AssertionError, match="image_size|shape"):
        run_python(["-m", "jaxdiff.cli", "train", f"--config={CFG}", f"--workdir={wd2}",
                    "--config.train.num_steps=9", "--config.data.image_size=16",
                    "--config.diffusion.prediction=v_prediction", "--noprogress"],
                   cache_dir=root / "cache")
    assert (wd2 / "config.json").read_text() == before
    # even a hand-edited config.json does not change what sampling restores
    cfg = json.loads(before)
    cfg["diffusion"]["prediction"] = "v_prediction"
    (wd2 / "config.json").write_text(json.dumps(cfg))
    config, _, _, _ = restore_for_sampling(str(wd2))
    assert config.diffusion.prediction == json.loads(before)["diffusion"]["prediction"]


def test_resume_past_num_steps_is_an_error(run, tmp_path):
    import shutil

    root, wd, _ = run
    wd2 = tmp_path / "wd3"
    shutil.copytree(wd, wd2)
    with pytest.raises(AssertionError, match=r"at step 6, past\s+train.num_steps=3"):
        run_python(["-m", "jaxdiff.cli", "train", f"--config={CFG}", f"--workdir={wd2}",
                    "--config.train.num_steps=3", "--noprogress"], cache_dir=root / "cache")
    assert os.path.isdir(wd2 / "checkpoints" / "6")


def test_eval_sweep_over_samplers_and_steps(run):
    """``jaxdiff eval --sampler ddim,heun --steps 2,3`` (``run_eval_sweep``): one result per pair
    with its NFE (Heun's 2N - 1 on this VP grid, DDIM's N), the pair's result equal to a single
    ``run_eval`` of it, one JSON file each and a table with a row each."""
    import jax.numpy as jnp

    from jaxdiff.eval import restore_for_sampling, run_eval, run_eval_sweep
    from jaxdiff.generate import class_labels, make_sample_fn

    root, wd, _ = run
    sweep = run_eval_sweep(str(wd), num=10, samplers=["ddim", "heun"], steps=[2, 3], features="digits",
                           batch_size=10, progress=False)
    results = sweep["results"]
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in results] == [
        ("ddim", 2, 2), ("ddim", 3, 3), ("heun", 2, 3), ("heun", 3, 5)]
    assert len({r["fid"] for r in results}) == 4 and all(os.path.exists(r["out"]) for r in results)
    single = run_eval(str(wd), num=10, sampler="heun", steps=3, features="digits", batch_size=10, progress=False,
                      out=str(root / "heun3.json"))
    assert single["fid"] == results[3]["fid"] and single["nfe"] == 5
    table = open(sweep["table"]).read().splitlines()
    assert sweep["table"].endswith(os.path.join("eval", "sweep_digits_10_ddim-heun_2-3.md"))
    assert table[2].startswith("| sampler | grid | steps | NFE | FD |") and len(table) == 4 + 4
    assert table[-1].startswith("| heun | linspace | 3 | 5 | ")  # the grid the config's process defaults to
    assert sweep["table_text"].splitlines() == table
    # grids: the NFE follows the grid (Karras: EDM's Heun, 2N - 1 as well); file names carry the grid
    by_grid = run_eval_sweep(str(wd), num=10, samplers=["heun"], steps=[3], grids=["karras", "trailing"],
                             features="digits", batch_size=10, progress=False)["results"]
    assert [(r["grid"], r["nfe"]) for r in by_grid] == [("karras", 5), ("trailing", 5)]
    assert by_grid[0]["out"].endswith("digits_heun_3_karras_10.json") and by_grid[0]["fid"] != by_grid[1]["fid"]
    # guidance scales: one result each, equal to a single guided run_eval; a guidance column in the table
    by_scale = run_eval_sweep(str(wd), num=10, samplers=["ddim"], steps=[2], features="digits", batch_size=10,
                              progress=False, guidances=[{"scale": 1.0}, {"scale": 3.0}])
    assert [r["guidance"]["scale"] for r in by_scale["results"]] == [1.0, 3.0]
    assert by_scale["results"][0]["fid"] == results[0]["fid"]  # scale 1: the unguided ddim-2 of the first sweep
    guided = run_eval(str(wd), num=10, sampler="ddim", steps=2, features="digits", batch_size=10, progress=False,
                      guidance={"scale": 3.0})
    assert guided["fid"] == by_scale["results"][1]["fid"] != results[0]["fid"]
    assert by_scale["table"].endswith("sweep_digits_10_ddim_2_guidance1-3.md")
    assert "| ddim | cfg3 | linspace | 2 | 2 |" in by_scale["table_text"]
    assert "| sampler | guidance | grid | steps | NFE | FD |" in by_scale["table_text"]
    # an adaptive sampler: the NFE its runs took (Dormand-Prince: 2 to start, 6 per attempted step, 1 into the
    # clean point), as a float mean over the batches
    adaptive = run_eval(str(wd), num=20, sampler="pf_ode_adaptive", steps=2, features="digits", batch_size=10,
                        progress=False)
    config, model, params, _ = restore_for_sampling(str(wd))
    fn = make_sample_fn(config, model, "pf_ode_adaptive", 2, 10, return_nfe=True)
    labels = class_labels(config, 20)
    per_batch = [int(fn(params, jax.random.fold_in(jax.random.PRNGKey(1), b), jnp.asarray(labels[10 * b:10 * b + 10]))[1])
                 for b in range(2)]
    assert all(n >= 9 and (n - 3) % 6 == 0 for n in per_batch)
    assert adaptive["nfe"] == np.mean(per_batch)
    with pytest.raises(ValueError, match="return_nfe is an option of the adaptive samplers"):
        make_sample_fn(config, model, "ddim", 2, 10, return_nfe=True)
    with pytest.raises(ValueError, match="unknown grid kind 'nope'"):
        run_eval_sweep(str(wd), num=10, samplers=["ddim"], steps=[2], grids=["nope"], features="digits")
    # a setting that does not fit (1,001 steps of a 1,000-step chain) fails before any sampling
    before = sorted(os.listdir(wd / "eval"))
    with pytest.raises(ValueError, match="num_steps"):
        run_eval_sweep(str(wd), num=10, samplers=["ddim"], steps=[2, 1001], features="digits")
    assert sorted(os.listdir(wd / "eval")) == before
    # a reference of another feature network's dimension (Inception's 2,048 vs the digits
    # classifier's) is refused before sampling
    from jaxdiff.metrics.fid import save_stats

    inception_ref = save_stats(str(root / "inception_like.npz"), np.zeros(2048), np.eye(2048))
    with pytest.raises(ValueError, match="holds 2048-d features but --features digits gives"):
        run_eval_sweep(str(wd), num=10, samplers=["ddim"], steps=[2], features="digits", ref=inception_ref)
    assert sorted(os.listdir(wd / "eval")) == before
    with pytest.raises(ValueError, match="one result file"):
        run_eval_sweep(str(wd), num=10, samplers=["ddim"], steps=[2, 3], features="digits", out=str(root / "x.json"))
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        run_eval_sweep(str(wd), num=10, samplers=["ddim", "nope"], steps=[2], features="digits")
