"""Soak test of preemption handling (not part of CI).

Trains ``jaxdiff train`` in one workdir for a given time while killing the process at random
moments -- SIGKILL (``kill -9``: nothing is saved, possibly mid-checkpoint-write) or SIGTERM
(preemption notice: the run should checkpoint the step it is at and exit 0) -- and restarting it.
Then it finishes the run and trains the same number of steps in one uninterrupted process, and
checks

* that no restart ever lost more than one checkpoint interval (steps logged before the kill minus
  the step the next run resumed from <= ``ckpt_every``), and that SIGTERM lost nothing. With
  asynchronous checkpoints (``--async``) a SIGKILL while a save is still being written also loses
  the steps trained during that write, and the summary counts those cases; the default
  synchronous writes (jaxdiff's default) make the bound strict;
* that the final params (and the whole train state) equal the uninterrupted run's, bit for bit.

    python scripts/soak.py --minutes 30 --workdir /tmp/soak

prints a short summary and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ASYNC = False  # --async sets True


def _args(config, workdir, num_steps, ckpt_every):
    return [sys.executable, "-m", "jaxdiff.cli", "train", f"--config={config}", f"--workdir={workdir}",
            f"--config.train.num_steps={num_steps}", f"--config.train.ckpt_every={ckpt_every}",
            f"--config.train.async_checkpoint={ASYNC}",
            "--config.train.log_every=1", "--config.train.keep=2", "--config.train.tensorboard=False",
            "--config.sample.num=0", "--noprogress"]


def _env(cache):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"), JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _max_logged_step(workdir) -> int:
    """The last step the run logged (log_every=1: the step it had reached)."""
    path = os.path.join(workdir, "metrics.jsonl")
    best = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    best = max(best, int(json.loads(line)["step"]))
                except (ValueError, KeyError):
                    pass  # a line torn by the kill
    return best


def _complete_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d)
                  if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def _incomplete(workdir) -> list[str]:
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if ".orbax-checkpoint-tmp" in n] if os.path.isdir(d) else []


def _run_to_end(config, workdir, num_steps, ckpt_every, cache) -> subprocess.CompletedProcess:
    proc = subprocess.run(_args(config, workdir, num_steps, ckpt_every), cwd=REPO, env=_env(cache),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run in {workdir} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _states_equal(a_dir, b_dir) -> tuple[bool, bool]:
    """(params equal, whole train state equal) of the latest checkpoints, bit for bit."""
    import jax
    import numpy as np

    from jaxdiff.checkpoint import CheckpointManager, load_config_json
    from jaxdiff.modeling import build_model
    from jaxdiff.train.loop import make_init_fn
    from jaxdiff.train.state import make_optimizer

    states = []
    for d in (a_dir, b_dir):
        cfg = load_config_json(os.path.join(d, "config.json"))
        abstract = jax.eval_shape(make_init_fn(cfg, build_model(cfg), make_optimizer(cfg)), jax.random.PRNGKey(0))
        ckpt = CheckpointManager(d, save_every=1)
        states.append(ckpt.restore(abstract))
        ckpt.close()

    def same(x, y):
        lx, ly = jax.tree.leaves(x), jax.tree.leaves(y)
        return len(lx) == len(ly) and all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(lx, ly))

    return same(states[0].params, states[1].params), same(states[0], states[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="time spent killing and restarting")
    ap.add_argument("--workdir", default="/tmp/jaxdiff_soak", help="scratch directory (emptied first)")
    ap.add_argument("--config", default="configs/toy2d.py:tiny")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--max-delay", type=float, default=20.0, help="longest time (s) trained before a kill")
    ap.add_argument("--sigterm-fraction", type=float, default=0.3, help="share of kills that are SIGTERM")
    ap.add_argument("--startup-fraction", type=float, default=0.2, help="share of kills before training starts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--async", dest="async_", action="store_true",
                    help="asynchronous checkpoint writes (train.async_checkpoint=True; default: synchronous)")
    args = ap.parse_args(argv)
    global ASYNC
    ASYNC = args.async_

    rng = random.Random(args.seed)
    shutil.rmtree(args.workdir, ignore_errors=True)
    run, ref, cache = (os.path.join(args.workdir, n) for n in ("run", "reference", "jax_cache"))
    os.makedirs(args.workdir)
    big = 10**9  # never reached during the soak
    k = args.ckpt_every
    events = []
    t_end = time.time() + 60 * args.minutes
    while time.time() < t_end:
        resumed_from = (_complete_steps(run) or [0])[-1]
        skipped_before = _incomplete(run)
        sig = signal.SIGTERM if rng.random() < args.sigterm_fraction else signal.SIGKILL
        during_startup = rng.random() < args.startup_fraction
        metrics = os.path.join(run, "metrics.jsonl")
        launched = time.time()
        proc = subprocess.Popen(_args(args.config, run, big, k), cwd=REPO, env=_env(cache),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if during_startup:  # a random moment of import / restore / compile
            delay = rng.uniform(0.2, 8.0)
        else:  # a random moment of training: wait until this process logs, then a random time
            while proc.poll() is None and not (os.path.exists(metrics) and os.path.getmtime(metrics) > launched):
                time.sleep(0.05)
            delay = time.time() - launched + rng.uniform(0.0, args.max_delay)
        time.sleep(max(0.0, launched + delay - time.time()))
        proc.send_signal(sig)
        _, err = proc.communicate()
        # Did this process train? Then it first trimmed metrics.jsonl to its start step and logged
        # every step after it (log_every=1), so the largest logged step is the step it reached.
        trained = os.path.exists(metrics) and os.path.getmtime(metrics) > launched
        reached = _max_logged_step(run) if trained else resumed_from
        restored = (_complete_steps(run) or [0])[-1]
        ev = {"signal": sig.name, "after_s": round(delay, 1), "rc": proc.returncode, "trained": trained,
              "resumed_from": resumed_from, "reached": reached, "checkpoint_after": restored,
              "lost": max(0, reached - restored), "incomplete_left": _incomplete(run),
              # a process killed before it got to training need not have reported anything
              "skip_reported": not trained or all(
                  f"skipped incomplete checkpoint {os.path.join(run, 'checkpoints', n)}" in err for n in skipped_before)}
        if sig == signal.SIGTERM and "SIGTERM received" in err:
            ev["graceful"] = proc.returncode == 0
        events.append(ev)
        print(json.dumps(ev), file=sys.stderr, flush=True)

    # Finish: one more interval from the last complete checkpoint, then the uninterrupted reference.
    final = (_complete_steps(run) or [0])[-1] + k
    _run_to_end(args.config, run, final, k, cache)
    t0 = time.time()
    _run_to_end(args.config, ref, final, k, cache)
    params_equal, state_equal = _states_equal(run, ref)

    kills = [e for e in events if e["signal"] == "SIGKILL"]
    terms = [e for e in events if e["signal"] == "SIGTERM"]
    graceful = [e for e in terms if "graceful" in e]
    max_lost = max((e["lost"] for e in events), default=0)
    summary = {
        "minutes": args.minutes, "config": args.config, "ckpt_every": k, "final_step": final,
        "restarts": len(events), "sigkill": len(kills), "sigterm": len(terms),
        "sigterm_during_training": len(graceful),
        "sigterm_graceful_exit0_no_loss": sum(e["graceful"] and e["lost"] == 0 for e in graceful),
        "incomplete_checkpoints_left_by_kills": sum(bool(e["incomplete_left"]) for e in events),
        "incomplete_skips_reported": all(e["skip_reported"] for e in events),
        "max_steps_lost": max_lost,
        "intervals_lost_over_one": sum(e["lost"] > k for e in events),
        "over_one_while_a_save_was_in_flight": sum(e["lost"] > k and bool(e["incomplete_left"]) for e in events),
        "async_checkpoint": ASYNC,
        "final_params_equal": params_equal, "final_state_equal": state_equal,
        "reference_seconds": round(time.time() - t0, 1),
    }
    ok = (params_equal and state_equal and max_lost <= k and summary["incomplete_skips_reported"]
          and summary["sigterm_graceful_exit0_no_loss"] == len(graceful))
    print(f"soak {args.minutes} min, {args.config}, ckpt_every={k}: {len(events)} kills "
          f"({len(kills)} SIGKILL, {len(terms)} SIGTERM, {len(graceful)} of them during training, "
          f"{summary['sigterm_graceful_exit0_no_loss']} exited 0 with nothing lost); "
          f"{summary['incomplete_checkpoints_left_by_kills']} kills left an incomplete checkpoint "
          f"(skip reported: {'yes' if summary['incomplete_skips_reported'] else 'NO'})")
    print(f"intervals lost (restarts losing more than ckpt_every={k} steps): {summary['intervals_lost_over_one']} "
          f"({summary['over_one_while_a_save_was_in_flight']} of them killed while an async save was in flight); "
          f"max loss {max_lost} steps vs ckpt_every {k}; {'async' if ASYNC else 'synchronous'} checkpoints")
    print(f"final params equal to an uninterrupted {final}-step run: {'yes' if params_equal else 'NO'} "
          f"(whole train state: {'yes' if state_equal else 'NO'})")
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
