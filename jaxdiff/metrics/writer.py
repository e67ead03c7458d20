"""Metrics to a JSON-lines file and TensorBoard event files (tensorboardX: no TensorFlow)."""

from __future__ import annotations

import json
import os

import jax


class MetricWriter:
    """Writes ``{"step": s, **scalars}`` lines to ``workdir/metrics.jsonl`` and TensorBoard
    events to ``workdir/tensorboard``. Only process 0 writes; other processes get a no-op."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            self._f = open(self.path, "a")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict) -> None:
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self.active:
            self._f.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._f.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """All rows of ``workdir/metrics.jsonl``."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
