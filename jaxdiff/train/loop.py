"""The training loop: data -> jitted, sharded, donated train step -> metrics, checkpoints, samples.

``train(config, workdir)`` starts a run, or resumes it from the latest Orbax checkpoint in
``workdir``. Everything that makes a step's result (the batch, the step key) is a function of
the step number, so a resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import parallel
from jaxdiff.checkpoint import CheckpointManager, config_to_json
from jaxdiff.data import batch_iterator, make_source
from jaxdiff.metrics.grid import save_samples
from jaxdiff.metrics.writer import MetricWriter
from jaxdiff.modeling import build_model, data_shape, num_classes
from jaxdiff.train.state import TrainState, init_state, make_optimizer
from jaxdiff.train.step import ema_specs, make_train_step

__all__ = ["train", "make_init_fn", "sampling_params"]


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


def sampling_params(state: TrainState, which: str | None = None):
    """Params to sample with: the named EMA copy, else the first EMA copy, else the raw params."""
    if which == "params" or not state.ema:
        return state.params
    if which:
        if which not in state.ema:
            raise ValueError(f"no EMA copy {which!r}; available: params, {', '.join(state.ema)}")
        return state.ema[which]
    return state.ema[sorted(state.ema)[0]]


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stderr)


def train(config, workdir: str, *, progress: bool = True, sample_at_end: bool = True, devices=None) -> dict:
    """Train (or resume) ``config`` in ``workdir``; returns a summary dict.

    ``devices`` (default: all) are the devices the ``config.mesh`` axes are laid over.

    Writes ``config.json``, ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/<step>/`` and
    ``samples/step_<N>.png`` under ``workdir``.
    """
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

    model = build_model(config)
    tx = make_optimizer(config.optim)
    init_fn = make_init_fn(config, model, tx)
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    state_shardings = jax.tree.map(lambda _: replicated, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)

    ckpt = CheckpointManager(workdir, save_every=int(tc.ckpt_every), keep=int(tc.get("keep", 3)),
                             async_save=bool(tc.get("async_checkpoint", True)))
    latest = ckpt.latest_step()
    if latest is not None:
        state = ckpt.restore(abstract, latest)
        _log(f"resumed from {ckpt.directory}/{latest}")
    else:
        state = jax.jit(init_fn, out_shardings=state_shardings)(jax.random.PRNGKey(int(config.seed)))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config_to_json(config), f, indent=2)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract.params))
    _log(f"model {config.model.name}: {n_params:,} parameters; {mesh.size} device(s) {dict(mesh.shape)}")

    step_fn = jax.jit(
        make_train_step(config, model, tx),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )

    start = int(jax.device_get(state.step))
    num_steps = int(tc.num_steps)
    log_every = int(tc.get("log_every", 50))
    writer = MetricWriter(workdir, tensorboard=bool(tc.get("tensorboard", True)))
    source = make_source(config.data, "train")
    batches = batch_iterator(source, global_batch, seed=int(config.seed), start_step=start,
                             flip=bool(config.data.get("flip", False)))
    pending: list[tuple[int, dict]] = []
    recent: list[float] = []
    pbar = tqdm(total=num_steps, initial=start, desc="training", disable=not progress or jax.process_index() != 0,
                dynamic_ncols=True)

    def flush_metrics():
        for s, m in jax.device_get(pending):
            writer.write(s, m)
            recent.append(float(m["loss"]))
        pending.clear()
        writer.flush()
        if recent:
            pbar.set_postfix(loss=f"{np.mean(recent[-log_every:]):.4f}")

    try:
        for step in range(start, num_steps):
            batch = parallel.shard_batch(next(batches), mesh)
            state, metrics = step_fn(state, batch)
            pending.append((step + 1, metrics))
            pbar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == num_steps:
                flush_metrics()
            if (step + 1) % int(tc.ckpt_every) == 0 and step + 1 != num_steps:
                ckpt.save(step + 1, state, config)
        flush_metrics()
        if num_steps > start or latest is None:
            ckpt.save(num_steps, state, config, force=True)
        ckpt.wait()
    finally:
        pbar.close()
        close = getattr(batches, "close", None)
        if close:
            close()
        writer.close()

    summary = {
        "workdir": workdir,
        "steps": num_steps,
        "train_seconds": round(time.time() - t_start, 1),
        "final_loss": float(np.mean(recent[-log_every:])) if recent else None,
        "checkpoint": os.path.join(ckpt.directory, str(num_steps)),
        "metrics": writer.path,
        "tensorboard": os.path.join(workdir, "tensorboard"),
    }
    sc = config.get("sample")
    if sample_at_end and sc is not None and int(sc.get("num", 0)) > 0:
        from jaxdiff.generate import generate

        images = generate(config, model, sampling_params(state, sc.get("params")), int(sc.num),
                          jax.random.PRNGKey(int(config.seed) + 1), sampler=sc.sampler,
                          num_steps=int(sc.steps), progress=progress, mesh=mesh)
        if jax.process_index() == 0:
            path = os.path.join(workdir, "samples", f"step_{num_steps}.png")
            summary["samples"] = save_samples(images, path, nrow=int(sc.get("nrow", 0)) or None)
    ckpt.close()
    return summary
