"""``jaxdiff import``: a diffusers DDPM pipeline folder -> a workdir (``jaxdiff.import_diffusers``).

End to end against diffusers: a randomly initialised ``UNet2DModel`` and a ``DDPMScheduler``
saved as a pipeline folder; jaxdiff imports them, restores the workdir as ``jaxdiff sample``
does, and its DDIM sampler on the imported network must land where diffusers' own DDIM loop
with the torch network lands from the same noise.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import samplers
from jaxdiff.schedules import grid_from_times, make_grid
from jaxdiff.eval import restore_for_sampling
from jaxdiff.import_diffusers import BETA_SCHEDULERS, import_pipeline, scheduler_settings
from jaxdiff.modeling import build_process, denoiser
from jaxdiff.nets.from_diffusers import load_unet
from tests.helpers import run_python
from tests.nets.test_from_diffusers import DDPM_LIKE, save_random_unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def make_pipeline(root, flat=False, **scheduler_kw):
    """A pipeline folder: unet/ + scheduler/ (or the old flat layout of google/ddpm-*)."""
    unet = save_random_unet(root if flat else root / "unet", DDPM_LIKE)
    sched = diffusers.DDPMScheduler(**scheduler_kw)
    sched.save_pretrained(str(root if flat else root / "scheduler"))
    return unet, sched


def test_imported_workdir_samples_like_the_diffusers_pipeline(tmp_path):
    unet, sched = make_pipeline(tmp_path / "pipe")
    summary = import_pipeline(str(tmp_path / "pipe"), str(tmp_path / "wd"))
    assert summary["prediction"] == "epsilon"
    assert summary["sample"] == {"grid": "leading", "clip_denoised": 1.0}  # DDPMScheduler's defaults
    assert summary["num_params"] == sum(p.numel() for p in unet.parameters())

    config, model, params, step = restore_for_sampling(str(tmp_path / "wd"))
    assert step == 0
    # a UNet2DModel has no trained null class: recorded, so that guidance on it warns
    assert config.diffusion.class_dropout == 0.0 and config.sample.set_alpha_to_one is True
    _, imported, _ = load_unet(str(tmp_path / "pipe" / "unet"))
    jax.tree.map(np.testing.assert_array_equal, params, imported)  # the EMA copy is the weights

    process = build_process(config)
    den = denoiser(config, model, params)
    jden = jax.jit(den)
    noise = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)

    # one denoiser call: jaxdiff's x0_hat against diffusers' eps turned into x0 in float64
    for t in (0, 417, 999):
        with torch.no_grad():
            eps = unet(to_torch(noise), t).sample.double().numpy().transpose(0, 2, 3, 1)
        abar = float(sched.alphas_cumprod[t])
        want = (noise - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        got = np.asarray(jden(jnp.asarray(noise), jnp.float32(t)))
        assert np.abs(got - want).max() / np.abs(want).max() < 1e-5, t

    # DDIM, 10 steps (diffusers' default leading spacing, clip_sample=True as the scheduler says).
    # A random network makes a poorly conditioned sampler: diffusers' own float32 loop is 8.7e-5
    # (relative) from its float64 loop; jaxdiff (measured 1.4e-4) must be within twice that.
    theirs32, ts = diffusers_ddim(unet, sched, noise, torch.float32)
    theirs64, _ = diffusers_ddim(unet, sched, noise, torch.float64, process)
    # the grid and the clipping as the imported config.sample says (what `jaxdiff sample` uses)
    grid = make_grid(process, 10, config.sample.grid)
    np.testing.assert_array_equal(np.asarray(grid.t[:-1]), np.asarray(grid_from_times(process, ts).t[:-1]))
    clip = config.sample.clip_denoised
    ours = np.asarray(jax.jit(lambda x: samplers.get("ddim")(den, x, grid, clip_denoised=clip))(jnp.asarray(noise)))
    scale = np.abs(theirs64).max()
    own, err = np.abs(theirs32 - theirs64).max() / scale, np.abs(ours - theirs64).max() / scale
    assert own < 1e-3 and err < 2 * own + 1e-5, (err, own)


def to_torch(x_nhwc, dtype=None):
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    return x if dtype is None else x.to(dtype)


def diffusers_ddim(unet, sched, noise, dtype, process=None, steps=10):
    """diffusers' DDIM loop (eta 0) from ``noise``; in float64 with the process's float64
    alphas_cumprod when ``process`` is given. Returns (final NHWC sample, timesteps)."""
    ddim = diffusers.DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(steps)
    if process is not None:
        ddim.alphas_cumprod = torch.tensor(np.asarray(process.alphas_cumprod), dtype=torch.float64)
        ddim.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    net = unet.to(dtype)
    x = to_torch(noise, dtype)
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(net(x, t).sample, t, x, eta=0.0).prev_sample
    unet.to(torch.float32)
    return x.float().numpy().transpose(0, 2, 3, 1), ddim.timesteps.numpy()


def test_learned_variance_unet_samples_like_diffusers_ddpm(tmp_path, monkeypatch):
    """An improved-diffusion-style pipeline (UNet with 2C outputs, DDPMScheduler with
    variance_type="learned_range") -> a workdir whose ddpm steps with the learned variances, as
    diffusers' scheduler does; the same injected noise on both sides."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_mod

    from tests.samplers.test_vs_diffusers import to_float64

    unet = save_random_unet(tmp_path / "pipe" / "unet", {**DDPM_LIKE, "out_channels": 6})
    diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False).save_pretrained(
        str(tmp_path / "pipe" / "scheduler"))
    summary = import_pipeline(str(tmp_path / "pipe"), str(tmp_path / "wd"))
    assert summary["variance"] == "learned_range" and summary["sample_variance"] == "learned_range"
    config, model, params, _ = restore_for_sampling(str(tmp_path / "wd"))
    process = build_process(config)
    grid = make_grid(process, 10, config.sample.grid)
    key = jax.random.key(4, impl="rbg")
    shape = (2, 16, 16, 3)
    noise = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    injected = [np.asarray(jax.random.normal(k, shape, jnp.float32)) for k in jax.random.split(key, 10)]
    den = denoiser(config, model, params, with_variance=True)
    ours = np.asarray(jax.jit(lambda x: samplers.get("ddpm")(den, x, grid, key=key, variance="learned_range"))(
        jnp.asarray(noise)))

    def theirs(dtype):
        sched = diffusers.DDPMScheduler.from_pretrained(str(tmp_path / "pipe" / "scheduler"))
        sched.set_timesteps(10)
        if dtype == torch.float64:
            to_float64(sched, process)
        state = {"i": 0}
        monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: to_torch(injected[state["i"]], dtype))
        net, x = unet.to(dtype), to_torch(noise, dtype)
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                state["i"] = i
                x = sched.step(net(x, t).sample, t, x).prev_sample
        unet.to(torch.float32)
        return x.double().numpy().transpose(0, 2, 3, 1), sched.timesteps.numpy()

    theirs32, ts = theirs(torch.float32)
    theirs64, _ = theirs(torch.float64)
    np.testing.assert_array_equal(np.asarray(grid.t[:-1]), np.asarray(grid_from_times(process, ts).t[:-1]))
    scale = np.abs(theirs64).max()
    own, err = np.abs(theirs32 - theirs64).max() / scale, np.abs(ours - theirs64).max() / scale
    fixed = np.asarray(jax.jit(lambda x: samplers.get("ddpm")(
        lambda x, t: den(x, t)[0], x, grid, key=key))(jnp.asarray(noise)))
    assert own < 1e-3 and err < 2 * own + 1e-5, (err, own)
    assert np.abs(fixed - theirs64).max() / scale > 100 * err  # the learned variances are what matched

    save_random_unet(tmp_path / "bad" / "unet", DDPM_LIKE)  # 3 output channels
    diffusers.DDPMScheduler(variance_type="learned_range").save_pretrained(str(tmp_path / "bad" / "scheduler"))
    with pytest.raises(ValueError, match="not 2 x 3"):
        import_pipeline(str(tmp_path / "bad"), str(tmp_path / "wd2"))
    # diffusers' fixed_small_log is fixed_small's variance (exponentiated from its log)
    diffusers.DDPMScheduler(variance_type="fixed_small_log").save_pretrained(str(tmp_path / "bad" / "scheduler"))
    summary = import_pipeline(str(tmp_path / "bad"), str(tmp_path / "wd3"))
    assert summary["variance"] == "fixed" and summary["sample_variance"] == "fixed_small"


def test_cli_import_flat_layout_and_refusals(tmp_path):
    make_pipeline(tmp_path / "pipe", flat=True, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    proc = run_python(["-m", "jaxdiff.cli", "import", f"--diffusers={tmp_path / 'pipe'}",
                       f"--workdir={tmp_path / 'wd'}"])
    summary = json.loads(proc.stdout)
    assert summary["prediction"] == "v_prediction"
    assert summary["process"]["beta_schedule"] == "squaredcos_cap_v2"
    saved = json.loads((tmp_path / "wd" / "config.json").read_text())
    assert saved["diffusion"]["prediction"] == "v_prediction" and saved["model"]["downsample_padding"] == "same"
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        import_pipeline(str(tmp_path / "pipe"), str(tmp_path / "wd"))
    (tmp_path / "pipe" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        import_pipeline(str(tmp_path / "pipe"), str(tmp_path / "wd2"))


def test_scheduler_settings():
    process, prediction, sample = scheduler_settings(
        {"_class_name": "DDPMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "beta_end": 0.012, "prediction_type": "sample", "clip_sample": False, "timestep_spacing": "trailing"})
    assert process == {"name": "discrete_vp", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                       "beta_end": 0.012, "num_train_timesteps": 1000, "rescale_betas_zero_snr": False}
    assert prediction == "sample" and sample == {"grid": "trailing", "clip_denoised": 0.0}
    # PNDM has no clip_sample and spaces its steps "leading" by default; Heun / KDPM2 default to
    # Stable Diffusion's betas
    assert scheduler_settings({"_class_name": "PNDMScheduler"})[2] == {"grid": "leading", "clip_denoised": 0.0}
    assert scheduler_settings({"_class_name": "EulerDiscreteScheduler"})[2]["grid"] == "linspace"
    heun = scheduler_settings({"_class_name": "HeunDiscreteScheduler"})[0]
    assert (heun["beta_start"], heun["beta_end"]) == (0.00085, 0.012)
    assert scheduler_settings({"_class_name": "DDIMScheduler", "clip_sample_range": 2.0})[2]["clip_denoised"] == 2.0
    assert scheduler_settings({"_class_name": "DDIMScheduler", "set_alpha_to_one": False})[2]["set_alpha_to_one"] is False
    assert scheduler_settings({"_class_name": "DDIMScheduler"})[2]["set_alpha_to_one"] is True
    # noise-level options map to jaxdiff's grids of the same spacing
    for option, kind in (("use_karras_sigmas", "karras"), ("use_exponential_sigmas", "logsnr"),
                         ("use_beta_sigmas", "beta_sigmas")):
        assert scheduler_settings({"_class_name": "EulerDiscreteScheduler", option: True})[2]["grid"] == kind
    # diffusers offsets "leading" timesteps only: with trailing / linspace steps_offset changes nothing
    assert scheduler_settings({"steps_offset": 1, "timestep_spacing": "trailing"})[2]["grid"] == "trailing"
    for bad, match in (({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
                       ({"prediction_type": "flow"}, "prediction_type='flow'"),
                       ({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 1348.0}, "scheduler ScoreSdeVeScheduler"),
                       ({"thresholding": True}, "thresholding=True"),
                       ({"steps_offset": 1}, "steps_offset=1"),
                       ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "allows one of them")):
        with pytest.raises(ValueError, match=match):
            scheduler_settings(bad)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_ddim_without_alpha_to_one_lands_where_diffusers_does(spacing, clip):
    """DDIMScheduler(set_alpha_to_one=False) ends on alphas_cumprod[0], not on clean data: with
    config.sample.set_alpha_to_one=False jaxdiff's ddim does too (a smooth stand-in eps network;
    float64 diffusers loop). Ending on clean data instead was 2.4e-3 .. 1.8e-2 away."""
    from jaxdiff import parameterization
    from jaxdiff.config_base import base_config
    from jaxdiff.generate import _grid_and_options

    w = np.random.default_rng(0).normal(size=(3, 3)) * 0.3
    config = base_config()
    config.diffusion.process = {"name": "discrete_vp"}
    config.diffusion.prediction = "epsilon"
    config.sample.grid, config.sample.clip_denoised, config.sample.set_alpha_to_one = spacing, clip, False
    process = build_process(config)
    grid, options = _grid_and_options(config, process, "ddim", 10, None, {})
    assert float(grid.t[-1]) == 0.0 and float(grid.alpha[-1]) == pytest.approx(np.sqrt(process.alphas_cumprod[0]))

    sched = diffusers.DDIMScheduler(set_alpha_to_one=False, timestep_spacing=spacing, clip_sample=clip > 0)
    sched.alphas_cumprod = torch.tensor(np.asarray(process.alphas_cumprod), dtype=torch.float64)
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(10)
    start = np.random.default_rng(1).normal(size=(4, 3))
    x = torch.tensor(start)
    for t in sched.timesteps:
        eps = torch.tensor(np.tanh(x.numpy() @ w) * (0.5 + float(t) / 2000.0))
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    net = lambda x, t: jnp.tanh(x @ jnp.asarray(w, jnp.float32)) * (0.5 + t[:, None] / 2000.0)  # noqa: E731
    den = parameterization.make_denoiser(net, process, "epsilon")
    ours = np.asarray(samplers.get("ddim")(den, jnp.asarray(start, jnp.float32), grid, **options))
    assert np.abs(ours - x.numpy()).max() < 1e-3


def test_pipelines_with_parts_not_imported_are_refused(tmp_path):
    make_pipeline(tmp_path / "ldm")
    (tmp_path / "ldm" / "model_index.json").write_text(json.dumps(
        {"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"],
         "scheduler": ["diffusers", "DDIMScheduler"]}))
    with pytest.raises(ValueError, match=r"parts jaxdiff does not import: vqvae \(VQModel\)"):
        import_pipeline(str(tmp_path / "ldm"), str(tmp_path / "wd"))
    (tmp_path / "ldm" / "model_index.json").write_text(json.dumps(
        {"unet": ["diffusers", "UNet2DModel"], "vae": ["diffusers", "VQModel"], "scheduler": [None, None]}))
    with pytest.raises(ValueError, match="vae is a VQModel"):
        import_pipeline(str(tmp_path / "ldm"), str(tmp_path / "wd"))
    (tmp_path / "ldm" / "model_index.json").unlink()
    (tmp_path / "ldm" / "vqvae").mkdir()
    with pytest.raises(ValueError, match="vqvae"):
        import_pipeline(str(tmp_path / "ldm"), str(tmp_path / "wd"))


def test_dit_pipeline_imports_with_its_vae(tmp_path):
    """facebook/DiT-XL-2-256's layout: transformer/ + vae/ + scheduler/ -> a DiT workdir whose
    samples are decoded by the VAE (32x32 images from 8x8x4 latents here)."""
    from tests.nets.test_from_diffusers import save_random_dit
    from tests.nets.test_vae import SMALL

    save_random_dit(tmp_path / "pipe" / "transformer")
    torch.manual_seed(1)
    diffusers.AutoencoderKL(**SMALL).save_pretrained(str(tmp_path / "pipe" / "vae"), safe_serialization=True)
    diffusers.DDIMScheduler(clip_sample=False).save_pretrained(str(tmp_path / "pipe" / "scheduler"))
    summary = import_pipeline(str(tmp_path / "pipe"), str(tmp_path / "wd"))
    assert summary["vae"] == str((tmp_path / "pipe" / "vae").resolve())
    assert summary["sample"] == {"grid": "leading", "clip_denoised": 0.0, "set_alpha_to_one": True}

    from jaxdiff.generate import make_sample_fn

    config, model, params, _ = restore_for_sampling(str(tmp_path / "wd"))
    assert config.model.name == "dit" and config.model.learn_sigma and config.data.channels == 4
    # DiT's sigma half was trained (L_hybrid): ddpm samples with it; DDIMScheduler names no variance
    assert config.diffusion.variance == "learned_range" and config.sample.variance == ""
    assert config.diffusion.class_dropout == 0.1  # DiT's null class was trained
    images = make_sample_fn(config, model, "ddim", 2, 2)(params, jax.random.PRNGKey(0), jnp.array([0, 1]))
    assert images.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(images)))


@pytest.mark.parametrize("cls", BETA_SCHEDULERS)
def test_scheduler_settings_defaults_are_each_schedulers_own(cls):
    """A config that omits a key gets that scheduler class's own default (diffusers' signature)."""
    import inspect

    import diffusers

    sig = inspect.signature(getattr(diffusers, cls).__init__).parameters
    default = lambda k, fallback: sig[k].default if k in sig else fallback  # noqa: E731
    process, prediction, sample = scheduler_settings({"_class_name": cls})
    assert process["beta_start"] == default("beta_start", None)
    assert process["beta_end"] == default("beta_end", None)
    assert process["beta_schedule"] == default("beta_schedule", None)
    assert process["num_train_timesteps"] == default("num_train_timesteps", None)
    assert prediction == default("prediction_type", None)
    # DPMSolverSinglestepScheduler has no timestep_spacing: the import names "linspace" (its own
    # steps are the multistep classes' "linspace", 999, 899, ..., 100 at 10 steps; jaxdiff's
    # "linspace" grid is 999, 888, ..., 0 -- see scheduler_settings)
    assert sample["grid"] == default("timestep_spacing", "linspace")
