"""Orbax checkpoints of the train state, with the experiment config saved beside each step.

A thin layer over ``orbax.checkpoint.CheckpointManager``: save every N steps and at the end,
keep K, asynchronous writes, and restore into an abstract (possibly sharded) target built with
``jax.eval_shape`` -- so a checkpoint written on 8 devices restores onto 1. No pickle anywhere.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

__all__ = ["CheckpointManager", "config_to_json", "load_config_json"]


def config_to_json(config) -> dict:
    """A JSON-able dict of a ConfigDict (tuples become lists)."""
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def load_config_json(path: str):
    """The ConfigDict written beside a run (``workdir/config.json``)."""
    import ml_collections

    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def _lists_to_tuples(x):
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


class CheckpointManager:
    """Save / restore ``TrainState`` pytrees under ``workdir/checkpoints/<step>/``."""

    def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)),
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

    def latest_step(self):
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, config, *, force: bool = False) -> bool:
        return self._mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json(config))),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """Restore into ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def restore_config(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self):
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.close()


def abstract_like(tree, sharding):
    """ShapeDtypeStructs of ``tree`` (arrays or structs) placed with ``sharding``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
