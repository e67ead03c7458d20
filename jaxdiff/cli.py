"""``jaxdiff`` command line: a thin layer over the library.

    jaxdiff train  --config configs/digits.py --workdir runs/digits [--config.optim.lr=1e-3 ...]
    jaxdiff sample --workdir runs/digits --sampler dpmpp_2m --steps 25 --num 100 --out grid.png

``train`` on a workdir that already has a checkpoint resumes it. ``sample`` rebuilds the model
from ``workdir/config.json`` and samples with the EMA parameters of the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, samples.")
flags.DEFINE_string("sampler", None, "Sampler name (default: config.sample.sampler); see jaxdiff.samplers.available().")
flags.DEFINE_integer("steps", None, "Number of sampler steps (default: config.sample.steps).")
flags.DEFINE_integer("num", None, "Number of samples (default: config.sample.num).")
flags.DEFINE_string("out", None, "Output PNG (default: WORKDIR/samples/<sampler>_<steps>.png).")
flags.DEFINE_integer("seed", 1, "Sampling seed.")
flags.DEFINE_integer("batch_size", 256, "Sampling batch size.")
flags.DEFINE_string("params", "", "Which weights to sample with: '' (first EMA copy), 'params', or an EMA name.")
flags.DEFINE_bool("progress", True, "Show progress bars.")

COMMANDS = ("train", "sample")


def _train() -> None:
    from jaxdiff.train import train

    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("jaxdiff train needs --config and --workdir")
    summary = train(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress)
    print(json.dumps(summary, indent=2))


def _sample() -> None:
    import jax

    from jaxdiff.checkpoint import CheckpointManager, load_config_json
    from jaxdiff.generate import generate
    from jaxdiff.metrics.grid import save_samples
    from jaxdiff.modeling import build_model
    from jaxdiff.train.loop import make_init_fn, sampling_params
    from jaxdiff.train.state import make_optimizer

    if FLAGS.workdir is None:
        raise app.UsageError("jaxdiff sample needs --workdir")
    cfg_path = os.path.join(FLAGS.workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise app.UsageError(f"{cfg_path} not found: is {FLAGS.workdir} a jaxdiff train workdir?")
    config = load_config_json(cfg_path)
    ckpt = CheckpointManager(FLAGS.workdir, save_every=1)
    step = ckpt.latest_step()
    if step is None:
        raise app.UsageError(f"no checkpoint under {ckpt.directory}")
    model = build_model(config)
    abstract = jax.eval_shape(make_init_fn(config, model, make_optimizer(config.optim)), jax.random.PRNGKey(0))
    state = ckpt.restore(abstract, step)
    sampler = FLAGS.sampler or config.sample.sampler
    steps = FLAGS.steps or int(config.sample.steps)
    num = FLAGS.num or int(config.sample.num)
    images = generate(config, model, sampling_params(state, FLAGS.params or config.sample.get("params")), num,
                      jax.random.PRNGKey(FLAGS.seed), sampler=sampler, num_steps=steps,
                      batch_size=FLAGS.batch_size, progress=FLAGS.progress)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "samples", f"{sampler}_{steps}.png")
    save_samples(images, out, nrow=int(config.sample.get("nrow", 0)) or None)
    print(json.dumps({"checkpoint_step": int(step), "sampler": sampler, "steps": steps, "num": num, "out": out}))
    ckpt.close()


def _main(argv) -> None:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: jaxdiff {{{','.join(COMMANDS)}}} [--flags]; got {argv[1:]}")
    {"train": _train, "sample": _sample}[argv[1]]()


def main() -> None:
    app.run(_main, argv=sys.argv)


if __name__ == "__main__":
    main()
