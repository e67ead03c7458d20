"""The training loop: data -> jitted, sharded, donated train step -> metrics, checkpoints, samples.

``train(config, workdir)`` starts a run, or resumes it from the latest Orbax checkpoint in
``workdir``. Everything that makes a step's result (the batch, the step key) is a function of
the step number, so a resumed run is bit-identical to an uninterrupted one.

Failures cost at most one checkpoint interval (with the default synchronous checkpoint writes;
with ``train.async_checkpoint=True`` a kill -9 while a write is in flight also loses the steps
trained during that write):

* SIGTERM / SIGINT (preemption, Ctrl-C): the handler only sets a flag; the loop finishes the
  current step, writes a checkpoint at that step, waits for it and returns a summary with
  ``"interrupted": "SIGTERM"`` (the CLI exits 0). The handlers are installed only while
  :func:`train` trains and the previous ones are restored afterwards.
* a kill mid-save leaves an incomplete ``<step>.orbax-checkpoint-tmp`` directory; the next run
  says it skipped it, deletes it and resumes from the last complete checkpoint.
* non-finite loss / gradients: the step keeps the old state (:mod:`jaxdiff.train.step`);
  ``train.nonfinite="skip"`` counts and logs such steps, ``"error"`` raises FloatingPointError
  naming the first one. The host reads the metrics every ``log_every`` steps and before every
  save, so "error" stops at most ``log_every`` steps late; no checkpoint is written with
  non-finite params (:meth:`jaxdiff.checkpoint.CheckpointManager.save` checks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import compile_options, parallel
from jaxdiff.checkpoint import CheckpointManager, config_to_json
from jaxdiff.config_base import check_config
from jaxdiff.data import batch_iterator, make_source
from jaxdiff.metrics.grid import save_samples
from jaxdiff.metrics.writer import MetricWriter
from jaxdiff.modeling import build_model, data_shape, num_classes
from jaxdiff.train.state import TrainState, init_state, make_optimizer
from jaxdiff.train.step import ema_specs, make_train_step, nonfinite_mode

__all__ = ["train", "make_init_fn", "sampling_key", "sampling_params"]


def make_init_fn(config, model, tx):
    """``init(rng) -> TrainState`` with the EMA copies the config asks for."""
    shape = data_shape(config)
    n_cls = num_classes(config)
    names = list(ema_specs(config))

    def init(rng):
        x = jnp.zeros((1,) + shape, jnp.float32)
        t = jnp.zeros((1,), jnp.float32)
        y = jnp.zeros((1,), jnp.int32) if n_cls else None
        state = init_state(model, tx, rng, x, t, y)
        state.ema = {name: jax.tree.map(jnp.copy, state.params) for name in names}
        return state

    return init


def sampling_key(ema_names, which: str | None = None) -> tuple[str, ...]:
    """Where in the train state the params to sample with are: ``("ema", which)`` for the named
    EMA copy, else ``("ema", first name in sorted order)``, else (``which == "params"`` or no
    EMA copies) ``("params",)``. ``ema_names``: the state's EMA names (``state.ema``'s keys).

    Raises ValueError naming the available copies if ``which`` is neither one nor "params"."""
    if which == "params" or not ema_names:
        return ("params",)
    if which:
        if which not in ema_names:
            raise ValueError(f"no EMA copy {which!r}; available: params, {', '.join(ema_names)}")
        return ("ema", which)
    return ("ema", sorted(ema_names)[0])


def sampling_params(state: TrainState, which: str | None = None):
    """Params to sample with: the named EMA copy, else the first EMA copy, else the raw params
    (:func:`sampling_key`)."""
    key = sampling_key(state.ema, which)
    return state.ema[key[1]] if key[0] == "ema" else state.params


def _compile_step(step_fn, state, batch):
    """``step_fn.lower(...).compile()``: compile once, up front, and log the compile time and the
    step's FLOPs from XLA's cost analysis (what an MFU figure divides)."""
    t0 = time.time()
    compiled = step_fn.lower(state, batch).compile()
    msg = f"train step compiled in {time.time() - t0:.1f} s"
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and cost.get("flops"):
            msg += f"; {float(cost['flops']) / 1e9:.3f} GFLOP per step (XLA cost analysis, per device program)"
    except Exception:  # noqa: BLE001 -- cost analysis is optional information
        pass
    _log(msg)
    return compiled


def _mesh_rules(config):
    """``config.mesh.rules``: ``((regex, spec), ...)`` overriding the default fsdp layout."""
    return tuple((str(r[0]), tuple(r[1])) for r in (config.mesh.get("rules", ()) or ()))


def abstract_train_state(config, model, tx, mesh):
    """``(abstract, shardings)``: the train state's shapes and dtypes as ``ShapeDtypeStruct`` s laid
    out on ``mesh`` (``config.mesh.rules`` applied), and those shardings; nothing is allocated.
    What the trainer initialises into and what a checkpoint is restored into."""
    abstract = jax.eval_shape(make_init_fn(config, model, tx), jax.random.PRNGKey(0))
    shardings = parallel.state_shardings(abstract, mesh, rules=_mesh_rules(config))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


class _StopFlag:
    """Signal handler that only records the signal; the loop acts on it between steps."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        self.signum = signum

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum is not None else None


@contextlib.contextmanager
def _stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
    """Install a :class:`_StopFlag` for ``signums`` (main thread only); restore the old handlers."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, flag) for s in signums}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# Model fields a resumed run may change: they change how the step runs, not the function.
RESUME_MAY_CHANGE = ("dropout", "dtype", "conv_impl")


def check_resume_config(saved: dict, config) -> None:
    """Raise ValueError if ``config`` builds another network or forward process than the config
    ``saved`` with a checkpoint (``CheckpointManager.restore_config``): a model field other than
    ``RESUME_MAY_CHANGE``, ``diffusion.process``, ``prediction`` (or ``sigma_data`` with EDM
    preconditioning). A restore only
    checks shapes, so e.g. another time embedding, GroupNorm epsilon or prediction type would
    otherwise train the restored weights as a different model without a word. Compared as built
    (module fields and process objects), so a field left at its default equals one set to it."""
    from jaxdiff.checkpoint import config_from_json
    from jaxdiff.modeling import build_process

    old = config_from_json(saved)
    a, b = _network_fields(old), _network_fields(config)
    diffs = []
    if a["class"] != b["class"]:
        diffs.append(f"model: checkpoint {a['class']} vs config {b['class']}")
    else:
        diffs += [f"model.{k}: checkpoint {a.get(k)!r} vs config {b.get(k)!r}"
                  for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    if build_process(old) != build_process(config):
        diffs.append(f"diffusion.process: checkpoint {old.diffusion.process.to_dict()} vs config "
                     f"{config.diffusion.process.to_dict()}")
    keys = ("prediction", "sigma_data") if config.diffusion.prediction == "edm" else ("prediction",)
    for key in keys:  # sigma_data is part of the network function under EDM preconditioning only
        va, vb = old.diffusion.get(key), config.diffusion.get(key)
        if va != vb:
            diffs.append(f"diffusion.{key}: checkpoint {va!r} vs config {vb!r}")
    if diffs:
        raise ValueError("\n  ".join(["it was written with another model or process:"] + diffs)
                         + "\nSet these keys to the checkpoint's values (--config.model.X=...; the run's "
                         "workdir/config.json lists them all), or train in a new --workdir.")


def _network_fields(config) -> dict:
    """The fields that define ``config``'s network, as built (defaults filled in), normalised
    where two settings build the same function: ``out_channels=None`` is the data's channel
    count, and ``num_heads`` is unused when ``head_dim`` is set."""
    model = build_model(config)
    out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.init and f.name not in ("parent", "name") + RESUME_MAY_CHANGE}
    if "out_channels" in out and out["out_channels"] is None:
        out["out_channels"] = data_shape(config)[-1]
    if out.get("head_dim") is not None:
        out.pop("num_heads", None)
    return {"class": type(model).__name__, **out}


def check_data_shape(config, source) -> None:
    """The dataset's examples must have the shape the model config describes."""
    want = tuple(data_shape(config))
    got = tuple(np.shape(source[np.arange(1)]["image"])[1:])
    if got != want:
        d = config.data
        if len(got) == 3:
            fix = (f"set --config.data.image_size={got[0]} --config.data.channels={got[2]}"
                   + ("" if got[0] == got[1] else " (and crop the images square)"))
        else:
            fix = f"set --config.data.dim={got[0] if got else 0}"
        raise ValueError(
            f"dataset {d.get('name')!r}{' (' + d.tfds_name + ')' if d.get('tfds_name') else ''} yields examples "
            f"of shape {got}, but the config describes {want} (data.image_size={d.get('image_size')}, "
            f"data.channels={d.get('channels')}, data.dim={d.get('dim')}): {fix}, or use a dataset of that shape.")


def check_data_labels(config, source) -> None:
    """A class-conditional model needs at least as many classes as the dataset has: label
    ``num_classes`` is the null class of classifier-free guidance, larger ones index past the table.
    Checked for sources that know their class count (in-memory arrays such as digits and toy2d:
    largest label + 1; image folders; latent datasets; TFDS ClassLabel features); and a source
    without labels (``has_labels`` False: a TFDS dataset without the label feature) is refused
    for a class-conditional model, which would otherwise learn from all-zero labels."""
    have = getattr(source, "num_classes", None)
    n = num_classes(config)
    if n and getattr(source, "has_labels", True) is False:
        from jaxdiff.data.latents import LatentSource

        fix = ("re-encode it from a labelled source (`jaxdiff encode` of an image folder, or of a TFDS dataset "
               "with a label feature)" if isinstance(source, LatentSource)
               else "name the label feature with --config.data.label_key")
        raise ValueError(f"config.model.num_classes={n} (class-conditional) but the dataset {source!r} has no "
                         f"labels; set --config.model.num_classes=0 for an unconditional model, or {fix}")
    if n and have and int(have) > n:
        raise ValueError(f"the dataset has {have} classes but config.model.num_classes={n}: set "
                         f"--config.model.num_classes={have} (label {n} is the null class of guidance)")


def _trim_metrics(path: str, start: int) -> None:
    """Keep the complete rows of ``metrics.jsonl`` up to step ``start``: after a kill, the steps
    past the restored checkpoint (and a half-written last line) are dropped, since they run again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= start:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(keep) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stderr)


def train(config, workdir: str, *, progress: bool = True, sample_at_end: bool = True, devices=None) -> dict:
    """Train (or resume) ``config`` in ``workdir``; returns a summary dict.

    ``devices`` (default: all) are the devices the ``config.mesh`` axes are laid over.

    Writes ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/<step>/`` and
    ``samples/step_<N>.png`` under ``workdir``.
    """
    check_config(config)
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    tc = config.train
    mesh = parallel.make_mesh(int(config.mesh.get("data", -1)), int(config.mesh.get("fsdp", 1)), devices)
    replicated = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    global_batch = int(config.data.batch_size)
    if global_batch % mesh.size:
        raise ValueError(f"data.batch_size={global_batch} is not divisible by the {mesh.size} devices")
    # the data is opened and checked against the config before the state is built (a large model's
    # initialisation takes minutes) and before anything is written under workdir
    source = make_source(config.data, "train")
    check_data_shape(config, source)
    check_data_labels(config, source)

    model = build_model(config)
    tx = make_optimizer(config)
    init_fn = make_init_fn(config, model, tx)
    abstract, state_shardings = abstract_train_state(config, model, tx, mesh)

    mode = nonfinite_mode(config)
    ckpt = CheckpointManager(workdir, save_every=int(tc.ckpt_every), keep=int(tc.get("keep", 3)),
                             async_save=bool(tc.get("async_checkpoint", False)),
                             cleanup=jax.process_index() == 0)  # only the writer deletes
    latest = ckpt.latest_step()
    for path in ckpt.incomplete:
        _log(f"skipped incomplete checkpoint {path} (its write was interrupted); "
             + (f"restoring the last complete one, step {latest}" if latest is not None else "no complete one: starting afresh"))
    if latest is not None:
        try:
            check_resume_config(ckpt.restore_config(latest), config)
        except Exception as e:
            ckpt.close()
            if isinstance(e, ValueError):
                raise ValueError(f"cannot resume {ckpt.directory}/{latest} with this config: {e}") from None
            raise
        state = ckpt.restore(abstract, latest)
        _log(f"resumed from {ckpt.directory}/{latest}")
    else:
        state = compile_options.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(int(config.seed)))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params))
    _log(f"model {config.model.name}: {n_params:,} parameters; {mesh.size} device(s) {dict(mesh.shape)}")

    step_fn = compile_options.jit(
        make_train_step(config, model, tx),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    start = int(jax.device_get(state.step))
    num_steps = int(tc.num_steps)
    log_every = int(tc.get("log_every", 50))
    if start > num_steps:
        ckpt.close()
        raise ValueError(
            f"the latest checkpoint in {ckpt.directory} is at step {start}, past "
            f"train.num_steps={num_steps}: pass --config.train.num_steps > {start} to train on, "
            f"or sample from it with `jaxdiff sample --workdir {workdir}`")
    if jax.process_index() == 0:
        _trim_metrics(os.path.join(workdir, "metrics.jsonl"), start)
    writer = MetricWriter(workdir, tensorboard=bool(tc.get("tensorboard", True)))
    if jax.process_index() == 0:  # only once the config has been checked against the data
        tmp = os.path.join(workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(config_to_json(config), f, indent=2)
        os.replace(tmp, os.path.join(workdir, "config.json"))  # atomic: a kill never leaves half a file
    batches = batch_iterator(source, global_batch, seed=int(config.seed), start_step=start,
                             flip=bool(config.data.get("flip", False)))
    pending: list[tuple[int, dict]] = []
    recent: list[float] = []
    skipped: list[int] = []
    pbar = tqdm(total=num_steps, initial=start, desc="training", disable=not progress or jax.process_index() != 0,
                dynamic_ncols=True)

    def flush_metrics():
        bad = []
        for s, m in jax.device_get(pending):
            writer.write(s, m)
            if int(m.get("nonfinite", 0)):
                bad.append((s, m))
            else:
                recent.append(float(m["loss"]))
        pending.clear()
        writer.flush()
        if recent:
            pbar.set_postfix(loss=f"{np.mean(recent[-log_every:]):.4f}")
        if bad and mode == "error":
            s, m = bad[0]
            raise FloatingPointError(
                f"non-finite loss or gradients at step {s} (loss={float(m['loss'])}, "
                f"grad_norm={float(m['grad_norm'])}); train.nonfinite='error' stops the run (detected at most "
                f"log_every={log_every} steps late; that step's update was not applied and no checkpoint holds "
                f"non-finite params). Resume from the last checkpoint in {ckpt.directory} with a lower "
                "--config.optim.lr or --config.optim.grad_clip, or set --config.train.nonfinite=skip.")
        if bad:
            skipped.extend(s for s, _ in bad)
            _log(f"skipped {len(bad)} update(s) with non-finite loss or gradients at step(s) "
                 f"{', '.join(str(s) for s, _ in bad[:10])}{' ...' if len(bad) > 10 else ''} "
                 f"({len(skipped)} in this run; train.nonfinite='skip')")

    compiled = []  # the train step, compiled ahead of time for the first batch's shapes and shardings
    interrupted = None  # the signal's name once a SIGTERM / SIGINT stopped the run
    end = num_steps
    try:
        with _stop_on_signals() as stop:
            saved = latest
            for step in range(start, num_steps):
                batch = parallel.shard_batch(next(batches), mesh)
                if not compiled:
                    compiled.append(_compile_step(step_fn, state, batch))
                state, metrics = compiled[0](state, batch)
                pending.append((step + 1, metrics))
                pbar.update(1)
                if (step + 1) % log_every == 0 or step + 1 == num_steps:
                    flush_metrics()
                if (step + 1) % int(tc.ckpt_every) == 0 and step + 1 != num_steps:
                    flush_metrics()  # "error" mode stops before a save; cheap: a save syncs anyway
                    if ckpt.save(step + 1, state, config):
                        saved = step + 1
                if stop.signum is not None and step + 1 != num_steps:
                    interrupted, end = stop.name, step + 1
                    _log(f"{stop.name} received: stopping after step {end}, writing a checkpoint")
                    break
            flush_metrics()
            if end != saved and (end > start or latest is None):
                ckpt.save(end, state, config, force=True)
            ckpt.wait()
    except BaseException:
        with contextlib.suppress(Exception):
            ckpt.wait()  # an error stops the run: let a (finite) checkpoint already in flight finish
        raise
    finally:
        pbar.close()
        close = getattr(batches, "close", None)
        if close:
            close()
        writer.close()

    summary = {
        "workdir": workdir,
        "steps": end,
        "train_seconds": round(time.time() - t_start, 1),
        "final_loss": float(np.mean(recent[-log_every:])) if recent else None,
        "checkpoint": os.path.join(ckpt.directory, str(end)),
        "metrics": writer.path,
        "tensorboard": os.path.join(workdir, "tensorboard"),
        "nonfinite_skipped": len(skipped),
    }
    if interrupted:
        summary.update(interrupted=interrupted, resume="run the same `jaxdiff train` command again")
        ckpt.close()
        return summary
    sc = config.get("sample")
    if sample_at_end and sc is not None and int(sc.get("num", 0)) > 0:
        from jaxdiff.generate import generate

        images = generate(config, model, sampling_params(state, sc.get("params")), int(sc.num),
                          jax.random.PRNGKey(int(config.seed) + 1), sampler=sc.sampler,
                          num_steps=int(sc.steps), progress=progress, mesh=mesh)
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{num_steps}.png")
            summary["samples"] = save_samples(images, path, nrow=int(sc.get("nrow", 0)) or None)
            from jaxdiff.eval import digits_score  # digits configs: classifier FD and accuracy (issue 5)

            summary.update(digits_score(config, images) or {})
    ckpt.close()
    return summary
