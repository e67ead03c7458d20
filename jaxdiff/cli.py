"""``jaxdiff`` command line: a thin layer over the library.

    jaxdiff train  --config configs/digits.py --workdir runs/digits [--config.optim.lr=1e-3 ...]
    jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 25 --num 100 --out grid.png
    jaxdiff stats  --config configs/cifar10_ddpm.py --out cifar10_train.npz [--save_features]
    jaxdiff eval   --workdir runs/cifar10 --num-samples 50000 --sampler dpmpp_2m --steps 25 --ref cifar10_train.npz
    jaxdiff eval   --workdir runs/digits --num-samples 1000 --features digits
    jaxdiff import --diffusers ddpm-cifar10-32 --workdir runs/ddpm_cifar10 [--config configs/cifar10_ddpm.py]
    jaxdiff import --diffusers DiT-XL-2-256 --workdir runs/dit_xl2   # transformer/ + vae/ + scheduler/
    jaxdiff encode --vae sd-vae-ft-ema --image_folder imagenet/train --out latents/imagenet256 [--image_size 256]

``train`` on a workdir that already has a checkpoint resumes it. ``sample`` and ``eval`` rebuild
the model from the config saved with the latest checkpoint and sample with its EMA parameters,
on this process's devices (whatever number of devices trained it). ``import`` turns a local copy
of a diffusers DDPM or DiT pipeline (``UNet2DModel`` or ``DiTTransformer2DModel``, VAE, scheduler
config) into such a workdir
(:mod:`jaxdiff.import_diffusers`). ``encode`` turns an image dataset (an ImageFolder tree or a
prepared TFDS dataset) into a latent dataset for ``config.data.name = "latents"`` (:mod:`jaxdiff.encode`).
"""

from __future__ import annotations

import json
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.DEFINE_string("sampler", None, "Sampler name (default: config.sample.sampler); see jaxdiff.samplers.available(). "
                    "eval: a comma-separated list sweeps the samplers.")
flags.DEFINE_string("steps", None, "Number of sampler steps (default: config.sample.steps). eval: a comma-separated "
                    "list (e.g. 5,10,20,50) sweeps the step counts: one result per sampler and step count, and a "
                    "Markdown table with the NFE of each.")
flags.DEFINE_integer("num", None, "Number of samples (default: config.sample.num).")
flags.DEFINE_string("out", None, "Output file: sample PNG (default: WORKDIR/samples/<sampler>_<steps>[_<grid>].png), "
                    "eval JSON of one setting (default: WORKDIR/eval/<features>_<sampler>_<steps>[_<grid>]_<num>.json; "
                    "a sweep writes one per setting and a table), stats .npz.")
flags.DEFINE_integer("seed", 1, "Sampling seed.")
flags.DEFINE_integer("batch_size", 256, "Sampling batch size.")
flags.DEFINE_string("params", "", "Which weights to sample with: '' (first EMA copy), 'params', or an EMA name.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_string("guidance_scale", None, "sample/eval: classifier-free guidance scale (default: "
                    "config.sample.guidance_scale; 1 = conditional model, 0 = unconditional). eval: a "
                    "comma-separated list (e.g. 1,1.5,3) sweeps the scales.")
flags.DEFINE_string("guidance_interval", None, "sample/eval: 'lo,hi': guide only where sigma/alpha is in (lo, hi] "
                    "(Kynkaanniemi et al. 2024); '' = every step.")
flags.DEFINE_enum("variance", None, ["fixed_small", "fixed_large", "learned_range"],
                  "sample/eval with --sampler ddpm: the reverse variance (default: config.sample.variance, else the "
                  "learned one for a diffusion.variance='learned_range' model, else fixed_small).")
flags.DEFINE_float("guidance_rescale", None, "sample/eval: CFG rescale phi (Lin et al. 2024; 0 = off).")
flags.DEFINE_integer("guidance_channels", None, "sample/eval: guide only the first N channels (DiT's code: 3 of its "
                     "4 latent channels); 0 = all (default: config.sample.guidance_channels).")
flags.DEFINE_string("grid", None, "sample/eval: time grid kind (jaxdiff.schedules.GRID_KINDS: linspace, leading, "
                    "trailing, karras, uniform, logsnr, beta, beta_sigmas; default: config.sample.grid, else the "
                    "process's default). eval: a comma-separated list sweeps the grids.")
flags.DEFINE_integer("decode_batch", None, "sample/eval of a latent model: each device decodes at most this many "
                     "latents at a time (default: config.sample.decode_batch; 0 = its whole share of the batch at once).")
# eval / stats (issue 5)
flags.DEFINE_integer("num_samples", 50000, "eval: number of samples to score (also --num-samples).")
flags.DEFINE_string("ref", None, "eval: reference statistics .npz (mu, sigma[, features]) from `jaxdiff stats` / pytorch-fid / ADM.")
flags.DEFINE_enum("features", "inception", ["inception", "digits"], "eval/stats: feature network.")
flags.DEFINE_string("inception_weights", None, "Converted Inception weights .npz (default: $JAXDIFF_INCEPTION_WEIGHTS).")
flags.DEFINE_string("split", "train", "stats: dataset split of --config's data; encode: the --tfds split read, "
                    "and the name of the split written under --out.")
flags.DEFINE_bool("save_features", False, "stats: also store all features (enables KID and precision/recall in eval).")
flags.DEFINE_string("diffusers", None, "import: a local diffusers pipeline folder (unet/ + scheduler/, the flat "
                    "config.json + diffusion_pytorch_model.safetensors + scheduler_config.json layout, or "
                    "transformer/ + vae/ + scheduler/ of DiT).")

# encode
flags.DEFINE_string("vae", None, "encode: a local diffusers AutoencoderKL folder (e.g. a copy of stabilityai/sd-vae-ft-ema).")
flags.DEFINE_string("image_folder", None, "encode: images in the ImageFolder layout, root/<class>/<image> "
                    "(labels: sorted class directories, as torchvision).")
flags.DEFINE_string("tfds", None, "encode: a prepared TFDS image dataset (e.g. imagenet2012); --split picks the split.")
flags.DEFINE_string("tfds_data_dir", None, "encode: TFDS data_dir of --tfds (default: TFDS's).")
flags.DEFINE_integer("image_size", 256, "encode: side of ADM's centre crop the VAE encodes.")
flags.DEFINE_bool("flip", True, "encode: also store each mirror image's latents (DiT trains with random flips).")
flags.DEFINE_enum("latent_dtype", "float32", ["float32", "float16"], "encode: storage dtype of the posterior means "
                  "(the stds stay float32).")
flags.DEFINE_integer("limit", 0, "encode: only the first N images (0: all).")
flags.DEFINE_string("out_split", "", "encode: name of the split written under --out (default: --split, which must "
                    "then be a plain name, not a TFDS slice such as 'train[:10%]').")
flags.DEFINE_integer("workers", 0, "encode: image decoding threads (0: min(16, CPU count)).")

COMMANDS = ("train", "sample", "eval", "stats", "import", "encode")


def _train() -> None:
    from jaxdiff.train import train

    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("jaxdiff train needs --config and --workdir")
    summary = train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    print(json.dumps(summary, indent=2))


def _sample() -> None:
    import jax

    from jaxdiff.eval import restore_for_sampling
    from jaxdiff.generate import generate
    from jaxdiff.metrics.grid import save_samples

    if FLAGS.workdir is None:
        raise app.UsageError("jaxdiff sample needs --workdir")
    samplers, steps_list, grids = _list_flag("sampler", str), _list_flag("steps", int), _list_flag("grid", str)
    if len(samplers) > 1 or len(steps_list) > 1 or len(grids) > 1:
        raise app.UsageError("jaxdiff sample takes one --sampler, one --steps and one --grid (sweeps are for jaxdiff "
                             "eval)")
    guidance = _guidance_flags()  # one --guidance_scale: checked before the checkpoint is read
    try:
        config, model, params, step = restore_for_sampling(FLAGS.workdir, FLAGS.params or "")
    except (FileNotFoundError, ValueError) as e:  # no checkpoint; an unknown --params name
        raise app.UsageError(str(e)) from None
    sampler = (samplers or [config.sample.sampler])[0]
    steps = (steps_list or [0])[0] or int(config.sample.steps)  # 0: the config's, as before
    num = FLAGS.num or int(config.sample.num)
    options = {}
    if FLAGS.variance:
        if sampler != "ddpm":
            raise app.UsageError(f"--variance is an option of --sampler ddpm, not of {sampler!r}")
        options["variance"] = FLAGS.variance
    if FLAGS.decode_batch is not None:
        options["decode_batch"] = FLAGS.decode_batch
    if grids:
        from jaxdiff.schedules import GRID_KINDS

        if grids[0] not in GRID_KINDS:
            raise app.UsageError(f"--grid={grids[0]!r}: unknown grid kind; valid: {', '.join(GRID_KINDS)}")
        options["grid_kind"] = grids[0]
    try:
        images = generate(config, model, params, num, jax.random.PRNGKey(FLAGS.seed), sampler=sampler,
                          num_steps=steps, batch_size=FLAGS.batch_size, progress=FLAGS.progress,
                          guidance_override=guidance, **options)
    except ValueError as e:  # a sampler, grid or step count that does not fit the model: the message says what
        raise app.UsageError(str(e)) from None
    tag = (f"_{grids[0]}" if grids else "") + (f"_{FLAGS.variance}" if FLAGS.variance else "")
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"{sampler}_{steps}{tag}.png")
    save_samples(images, out, nrow=int(config.sample.get("nrow", 0)) or None)
    summary = {"checkpoint_step": int(step), "sampler": sampler, "steps": steps, "num": num, "out": out}
    if grids:
        summary["grid"] = grids[0]
    if sampler == "ddpm":
        from jaxdiff.generate import ddpm_variance

        summary["variance"] = ddpm_variance(config, FLAGS.variance)
    print(json.dumps(summary))


def _list_flag(name: str, kind) -> list:
    """``--sampler a,b`` / ``--steps 5,10``: the comma-separated values of a flag, each once ([] if not
    given)."""
    value = FLAGS[name].value
    if value is None:
        return []
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    try:
        return list(dict.fromkeys(kind(p) for p in parts))  # a repeated value once
    except ValueError:
        raise app.UsageError(f"--{name}={value!r}: expected comma-separated {kind.__name__} values") from None


def _guidance_flags(scale: float | None = None) -> dict:
    """The --guidance_* flags that were given, as a guidance_settings override; ``scale``: one of
    the --guidance_scale values (default: the flag's single value)."""
    g = {}
    if scale is None:
        scales = _list_flag("guidance_scale", float)
        if len(scales) > 1:
            raise app.UsageError("jaxdiff sample takes one --guidance_scale (sweeps are for jaxdiff eval)")
        scale = scales[0] if scales else None
    if scale is not None:
        g["scale"] = float(scale)
    if FLAGS.guidance_interval is not None:
        parts = [p for p in FLAGS.guidance_interval.replace("(", "").replace(")", "").split(",") if p.strip()]
        if len(parts) not in (0, 2):
            raise app.UsageError(f"--guidance_interval must be 'lo,hi' or '', got {FLAGS.guidance_interval!r}")
        try:
            g["interval"] = (float(parts[0]), float(parts[1])) if parts else None
        except ValueError:
            raise app.UsageError(f"--guidance_interval must be two numbers 'lo,hi' (or ''), got "
                                 f"{FLAGS.guidance_interval!r}") from None
    if FLAGS.guidance_rescale is not None:
        g["rescale"] = float(FLAGS.guidance_rescale)
    if FLAGS.guidance_channels is not None:
        if FLAGS.guidance_channels < 0:
            raise app.UsageError(f"--guidance_channels must be >= 0 (0 = all), got {FLAGS.guidance_channels}")
        g["channels"] = int(FLAGS.guidance_channels) or None
    return g


def _eval() -> None:
    from jaxdiff.eval import run_eval_sweep

    if FLAGS.workdir is None:
        raise app.UsageError("jaxdiff eval needs --workdir (and --ref STATS.npz unless --features digits)")
    samplers, steps, grids = _list_flag("sampler", str), _list_flag("steps", int), _list_flag("grid", str)
    if FLAGS.variance and any(s != "ddpm" for s in samplers):
        raise app.UsageError(f"--variance is an option of --sampler ddpm, not of {FLAGS.sampler!r}")
    if FLAGS.features == "inception" and not FLAGS.ref:
        raise app.UsageError("jaxdiff eval --features inception needs --ref STATS.npz (make one with `jaxdiff stats`)")
    try:
        sweep = run_eval_sweep(FLAGS.workdir, num=FLAGS.num_samples, samplers=samplers, steps=steps,
                               ref=FLAGS.ref, features=FLAGS.features, inception_weights=FLAGS.inception_weights,
                               batch_size=FLAGS.batch_size, seed=FLAGS.seed, which=FLAGS.params, out=FLAGS.out,
                               progress=FLAGS.progress, variance=FLAGS.variance,
                               guidances=[_guidance_flags(s) for s in _list_flag("guidance_scale", float) or [None]],
                               decode_batch=FLAGS.decode_batch, grids=grids)
    except (FileNotFoundError, ValueError) as e:  # missing weights / reference / workdir, a flag that does not
        raise app.UsageError(str(e)) from None  # fit the model or sampler: the message says what to do
    if sweep["table"] is None:
        print(json.dumps(sweep["results"][0], indent=2))
        return
    import jax

    if jax.process_index() == 0:
        print(sweep["table_text"], file=sys.stderr)
    print(json.dumps({"results": sweep["results"], "table": sweep["table"]}, indent=2))


def _stats() -> None:
    from jaxdiff.data import make_source
    from jaxdiff.eval import run_stats

    if FLAGS.config is None or FLAGS.out is None:
        raise app.UsageError("jaxdiff stats needs --config (its data section is the dataset) and --out STATS.npz")
    if FLAGS.config.data.name == "latents":
        raise app.UsageError("jaxdiff stats of a latent dataset: reference statistics are of images; pass a config "
                             "whose data are the images (data.name='tfds'), or use ADM's reference batch")
    try:
        summary = run_stats(make_source(FLAGS.config.data, FLAGS.split), FLAGS.out, features=FLAGS.features,
                            inception_weights=FLAGS.inception_weights, batch_size=FLAGS.batch_size,
                            save_features=FLAGS.save_features, progress=FLAGS.progress)
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None
    print(json.dumps(summary, indent=2))


def _import() -> None:
    from jaxdiff.import_diffusers import import_pipeline

    if FLAGS.diffusers is None or FLAGS.workdir is None:
        raise app.UsageError("jaxdiff import needs --diffusers PIPELINE_DIR and --workdir (a new one)")
    try:
        summary = import_pipeline(FLAGS.diffusers, FLAGS.workdir, FLAGS.config)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print(json.dumps(summary, indent=2))


def _encode() -> None:
    from jaxdiff.encode import encode_images, image_reader

    if not FLAGS.vae or not FLAGS.out:
        raise app.UsageError("jaxdiff encode needs --vae VAE_DIR, --out LATENTS_DIR and one of --image_folder DIR, "
                             "--tfds NAME")
    batch = FLAGS.batch_size if FLAGS["batch_size"].present else 32
    out_split = FLAGS.out_split or FLAGS.split
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", out_split) or out_split in (".", ".."):
        raise app.UsageError(f"the latent split is named after --split={out_split!r}, which is not a plain name: pass "
                             "--out_split NAME (e.g. train)")
    try:
        images = image_reader(FLAGS.image_folder or "", FLAGS.tfds or "", split=FLAGS.split,
                              data_dir=FLAGS.tfds_data_dir)
        summary = encode_images(images, FLAGS.vae, FLAGS.out, split=out_split, image_size=FLAGS.image_size,
                                batch_size=batch, flip=FLAGS.flip, dtype=FLAGS.latent_dtype, limit=FLAGS.limit,
                                progress=FLAGS.progress, workers=FLAGS.workers or None)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise app.UsageError(str(e)) from None
    summary["train_with"] = f"--config.data.name=latents --config.data.latents_dir={FLAGS.out}" + (
        "" if out_split == "train" else f" (split {out_split!r})")
    print(json.dumps(summary, indent=2))


flags.DEFINE_bool("multihost", False, "Multi-process run: call jax.distributed.initialize() (auto-detects TPU pods, "
                  "SLURM, Open MPI); implied by --coordinator_address or JAX_COORDINATOR_ADDRESS.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed (multi-process runs).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


_NO_CONFIG_OVERRIDES = (
    "jaxdiff {command} rebuilds the model from the config saved with the checkpoint and does not read --config "
    "or --config.* overrides; choose the sampling settings with --sampler, --steps, --grid, --num, "
    "--guidance_scale, --guidance_interval, --guidance_rescale, --guidance_channels, --variance, --decode_batch, --params")


def _main(argv) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: jaxdiff {{{','.join(COMMANDS)}}} [--flags]; got {argv[1:]}")
    if argv[1] in ("sample", "eval") and FLAGS["config"].present:
        raise app.UsageError(_NO_CONFIG_OVERRIDES.format(command=argv[1]))
    from jaxdiff.parallel import initialize_distributed

    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, force=FLAGS.multihost)
    {"train": _train, "sample": _sample, "eval": _eval, "stats": _stats, "import": _import,
     "encode": _encode}[argv[1]]()


def _config_spec(argv) -> str | None:
    for i, arg in enumerate(argv):
        for prefix in ("--config=", "-config="):
            if arg.startswith(prefix):
                return arg[len(prefix):]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _parse_flags(argv):
    """absl's flag parsing, except that an unknown ``--config.<key>`` says which part of the key
    is unknown and lists the valid keys there (instead of a traceback)."""
    try:
        return FLAGS(argv)
    except (flags.Error, KeyError, AttributeError) as error:
        spec = _config_spec(argv)
        if not spec:
            return app.parse_flags_with_usage(argv)  # absl's own message and exit
        from jaxdiff.config_base import load_config_file, unknown_key_message

        config = load_config_file(spec)
        for arg in argv[1:]:
            name = arg.lstrip("-").split("=", 1)[0]
            if name.startswith("config.") and (msg := unknown_key_message(config, name[len("config."):])):
                sys.stderr.write(f"FATAL Flags parsing error: {msg}\n")
                sys.exit(1)
        if isinstance(error, flags.Error):
            # this error, not a re-parse: parsing again would re-define the --config.* override
            # flags and report "defined twice" instead of, e.g., a badly typed value
            sys.stderr.write(f"FATAL Flags parsing error: {error}\n"
                             f"Pass --helpshort or --helpfull to see help on flags.\n")
            sys.exit(1)
        raise


def _underscore_flag_names(argv):
    """``--num-samples=5`` -> ``--num_samples=5`` for defined flags (absl only knows underscores)."""
    out = []
    for arg in argv:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "-" in name and not name.startswith("config") and name.replace("-", "_") in FLAGS:
            arg = "--" + name.replace("-", "_") + arg[2 + len(name):]
        out.append(arg)
    return out


def _register_help() -> None:
    """``jaxdiff --help`` / ``--helpshort``: absl prints the ``__main__`` module's docstring and the
    key flags of ``sys.argv[0]``; under the console-script entry point neither is this module, so
    its docstring (the commands) and flags are registered there."""
    main_module = sys.modules.get("__main__")
    if main_module is not None and not getattr(main_module, "__doc__", None):
        main_module.__doc__ = __doc__
    for flag in FLAGS.flags_by_module_dict().get(__name__, []):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def main() -> None:
    _register_help()
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in ("sample", "eval") and any(a.lstrip("-").startswith("config") for a in sys.argv[1:]):
        sys.stderr.write(f"FATAL {_NO_CONFIG_OVERRIDES.format(command=command)}\n")
        sys.exit(1)
    app.run(_main, argv=_underscore_flag_names(sys.argv), flags_parser=_parse_flags)


if __name__ == "__main__":
    main()
