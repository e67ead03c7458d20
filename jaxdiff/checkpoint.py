"""Orbax checkpoints of the train state, with the experiment config saved beside each step.

A thin layer over ``orbax.checkpoint.CheckpointManager``: save every N steps and at the end,
keep K, asynchronous writes, and restore into an abstract (possibly sharded) target built with
``jax.eval_shape`` -- so a checkpoint written on 8 devices restores onto 1. No pickle anywhere.

Interrupted writes: Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames it to
``<step>`` only when every item is complete (``commit_success.txt`` inside), so a process killed
mid-save leaves a tmp directory that Orbax never lists. :attr:`CheckpointManager.incomplete` names
those directories (the trainer reports them as skipped); with ``cleanup=True`` Orbax deletes them.

Before restoring, :meth:`CheckpointManager.restore` compares the shapes stored in the
checkpoint's metadata with the target's and names every parameter that differs.
:meth:`CheckpointManager.restore_subtree` reads one part of the state (the EMA copy a sampler
uses) and nothing else.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointManager", "CheckpointMismatchError", "config_to_json", "config_from_json",
           "load_config_json",
           "tree_is_finite"]

TMP_MARKER = ".orbax-checkpoint-tmp"
KILL_DURING_SAVE_ENV = "JAXDIFF_KILL_DURING_SAVE"  # test hook: SIGKILL self while saving this step


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not have the shapes the current config builds."""


def tree_is_finite(tree) -> bool:
    """True if every floating leaf of ``tree`` is finite (one device reduction, one host sync)."""
    leaves = [x for x in jax.tree.leaves(tree) if np.issubdtype(np.dtype(x.dtype), np.inexact)]
    if not leaves:
        return True
    return bool(jax.device_get(_all_finite(leaves)))


@jax.jit
def _all_finite(leaves):
    import jax.numpy as jnp

    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _path_str(path) -> str:
    """``params/down_0/conv/kernel``: a pytree key path joined with "/"."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _shapes(tree) -> dict:
    return {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "shape")}


def config_to_json(config) -> dict:
    """A JSON-able dict of a ConfigDict (tuples become lists)."""
    return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def load_config_json(path: str):
    """The ConfigDict written beside a run (``workdir/config.json``)."""
    import ml_collections

    with open(path) as f:
        return ml_collections.ConfigDict(_lists_to_tuples(json.load(f)))


def config_from_json(d: dict):
    """A ConfigDict from its JSON form (lists become tuples), e.g. :meth:`CheckpointManager.restore_config`'s."""
    import ml_collections

    return ml_collections.ConfigDict(_lists_to_tuples(d))


def _lists_to_tuples(x):
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    return x


class CheckpointManager:
    """Save / restore ``TrainState`` pytrees under ``workdir/checkpoints/<step>/``."""

    def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True,
                 cleanup: bool = False):
        """``cleanup=True`` deletes incomplete (interrupted) step directories; only the process
        that writes checkpoints should ask for it. :attr:`incomplete` lists them either way."""
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.incomplete = self._find_incomplete()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(save_every)),
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=bool(cleanup),
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _find_incomplete(self) -> list[str]:
        """Step directories an interrupted save left behind (Orbax's tmp names), oldest first."""
        if not os.path.isdir(self.directory):
            return []
        names = [n for n in os.listdir(self.directory) if TMP_MARKER in n]
        return [os.path.join(self.directory, n) for n in sorted(names, key=lambda n: (len(n), n))]

    def latest_step(self):
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def save(self, step: int, state, config, *, force: bool = False) -> bool:
        """Start an (async) save of ``state`` at ``step``; refuses non-finite params or EMA.

        Raises FloatingPointError (and writes nothing) if ``state.params`` or ``state.ema`` hold
        a NaN or Inf, so a checkpoint never carries a diverged model.
        """
        if not (force or self._mngr.should_save(int(step))):
            return False
        weights = {"params": getattr(state, "params", state), "ema": getattr(state, "ema", {})}
        if not tree_is_finite(weights):
            raise FloatingPointError(
                f"refusing to write the checkpoint at step {step}: the params or EMA weights hold "
                f"NaN/Inf. The last complete checkpoint in {self.directory} is step "
                f"{self.latest_step()}; lower optim.lr or set train.nonfinite='skip'.")
        started = self._mngr.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json(config))),
            force=force,
        )
        if os.environ.get(KILL_DURING_SAVE_ENV) == str(int(step)):
            # Fault injection for tests and scripts/soak.py: SIGKILL this process while the
            # asynchronous write of this step is still in flight (before Orbax's final rename).
            # With synchronous writes the save has already completed here. Orbax may create the
            # step's temporary folder on its background thread (after a previous save in flight
            # finishes), so wait for that folder first (up to 60 s), then kill.
            import signal
            import time

            prefix, deadline = f"{int(step)}.", time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                    n.startswith(prefix) and TMP_MARKER in n for n in os.listdir(self.directory)):
                time.sleep(0.0005)
            os.kill(os.getpid(), signal.SIGKILL)
        return started

    def _step_or_latest(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def restore(self, abstract_state, step: int | None = None):
        """Restore into ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct`` with shardings)."""
        step = self._step_or_latest(step)
        self.check_shapes(abstract_state, step)
        out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return out.state

    def restore_subtree(self, abstract_subtree, key_path: tuple[str, ...], step: int | None = None):
        """Restore only the part of the saved state at ``key_path`` -- ``("params",)``, or
        ``("ema", name)`` for one EMA copy -- into ``abstract_subtree`` (``ShapeDtypeStruct`` s
        with shardings, the structure of that part) and return it.

        The other arrays (optimizer moments, other EMA copies) are not read from disk: Orbax's
        ``PyTreeRestore(partial_restore=True)`` skips every array its target omits.
        (``StandardRestore`` has no partial restore; ``StandardCheckpointHandler`` writes the
        "state" item through ``PyTreeCheckpointHandler``, so that handler reads it.) Shapes are
        checked first, as by :meth:`restore`, for the arrays under ``key_path``.
        """
        step = self._step_or_latest(step)
        target = abstract_subtree
        for key in reversed(key_path):
            target = {key: target}
        self.check_shapes(target, step, key_path)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        with ocp.PyTreeCheckpointer() as reader:
            out = reader.restore(os.path.join(self.directory, str(int(step)), "state"),
                                 args=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True))
        for key in key_path:
            out = out[key]
        return out

    def check_shapes(self, abstract_state, step: int, key_path: tuple[str, ...] = ()) -> None:
        """Raise :class:`CheckpointMismatchError` naming every array whose stored shape differs
        from ``abstract_state``'s (or that only one of them has), read from the checkpoint's
        metadata without loading any array. With ``key_path`` (as :meth:`restore_subtree`
        takes it; ``abstract_state`` then nests the subtree under it), only the stored arrays
        under that path are compared, and they are the ones named."""
        meta = self._mngr.item_metadata(step)["state"]
        under = "".join(f"{k}/" for k in key_path)
        stored = {k: s for k, s in _shapes(getattr(meta, "tree", meta)).items() if k.startswith(under)}
        wanted = _shapes(abstract_state)
        differ_all = [k for k in sorted(stored.keys() & wanted.keys()) if stored[k] != wanted[k]]
        # Name the parameters; the EMA copies and optimizer moments mirror them.
        params = under or "params/"
        named = [k for k in differ_all if k.startswith(params)] or differ_all
        differ = [f"  {k}: checkpoint {stored[k]} vs config {wanted[k]}" for k in named]
        mirrored = len(differ_all) - len(named)
        only_ckpt = sorted(stored.keys() - wanted.keys())
        only_cfg = sorted(wanted.keys() - stored.keys())
        if not (differ or only_ckpt or only_cfg):
            return
        params_differ = any(k.startswith(params) for k in differ_all + only_ckpt + only_cfg)
        if params_differ or under:
            lines = [f"checkpoint {self.directory}/{step} was written by a different model config:"]
        else:  # parameters alike: the optimizer chain or the EMA copies are what changed
            lines = [f"checkpoint {self.directory}/{step} has the same parameters but a different optimizer / EMA "
                     "state (optim.grad_clip switched on or off, another optimizer, other ema.decays: the "
                     "optimizer chain and the EMA copies are part of the checkpointed state):"]
        if differ:
            lines.append(f"{len(differ)} {'parameter' if params_differ or under else 'array'} shape(s) differ:")
            lines += differ[:20] + ([f"  ... and {len(differ) - 20} more"] if len(differ) > 20 else [])
            if mirrored:
                lines.append(f"(and {mirrored} EMA / optimizer-state arrays of those parameters)")
        for what, keys in (("only in the checkpoint", only_ckpt), ("only in the config", only_cfg)):
            shown = [k for k in keys if k.startswith(params)] or keys
            if shown:
                rest = len(keys) - len(shown)
                lines.append(f"{len(shown)} {'parameter' if shown[0].startswith(params) else 'array'}(s) {what}: "
                             + ", ".join(shown[:10]) + (f", ... ({len(shown) - 10} more)" if len(shown) > 10 else "")
                             + (f" (and {rest} EMA / optimizer-state arrays of them)" if rest else ""))
        lines.append("Use the config the run was trained with (its workdir/config.json), or a new --workdir.")
        raise CheckpointMismatchError("\n".join(lines))

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
