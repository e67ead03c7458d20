"""Train a noise-aware classifier ``p(y | x_t, t)`` for classifier guidance.

The classifier sees ``x_t = alpha(t) x0 + sigma(t) eps`` at times drawn the way the diffusion
trainer draws them (``process.sample_t``) and the network time ``process.net_time(t)``, and is
fitted by cross-entropy (Dhariwal & Nichol 2021, Sec. 4.1: "we train a classifier on noisy
images"). :func:`classifier_log_prob` turns it into the ``log_prob(x, t)`` that
:func:`jaxdiff.guidance.classifier_guidance` takes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxdiff import compile_options
from jaxdiff.processes import Process

__all__ = ["train_noisy_classifier", "classifier_log_prob", "noisy_accuracy"]


def _noisy_batch(process: Process, key, x0):
    k_t, k_eps = jax.random.split(key)
    t = process.sample_t(k_t, (x0.shape[0],))
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    return process.marginal(x0, t, eps), t


def train_noisy_classifier(model, process: Process, data, labels, *, num_steps: int, key,
                           batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 1e-4,
                           progress: bool = True):
    """Fit ``model`` (e.g. :class:`jaxdiff.nets.classifier.NoisyClassifier`) on noisy ``data``.

    Args:
      model: Flax module, ``model.apply({'params': p}, x_t, net_time, train=...) -> logits``.
      process: the forward process of the diffusion model to be guided.
      data, labels: clean examples ``(N, ...)`` and int labels ``(N,)`` (numpy or jax).
      num_steps, batch_size, lr, weight_decay: AdamW with a cosine decay of ``lr``.
      key: PRNG key (init, batches, noise, dropout).

    Returns:
      ``(params, losses)``: the trained params and the per-step cross-entropy (numpy array).
    """
    data = jnp.asarray(data, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"data has {data.shape[0]} examples but labels has {labels.shape[0]}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    k_init, k_run = jax.random.split(key)
    params = model.init(k_init, data[:2], process.net_time(jnp.zeros((2,))), train=False)["params"]
    opt = optax.adamw(optax.cosine_decay_schedule(lr, num_steps, 0.05), weight_decay=weight_decay)
    opt_state = opt.init(params)

    @compile_options.jit
    def step(params, opt_state, k):
        k_idx, k_noise, k_drop = jax.random.split(k, 3)
        idx = jax.random.randint(k_idx, (batch_size,), 0, data.shape[0])
        x_t, t = _noisy_batch(process, k_noise, data[idx])

        def loss_fn(p):
            logits = model.apply({"params": p}, x_t, process.net_time(t), train=True, rngs={"dropout": k_drop})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for i in tqdm(range(num_steps), desc="noisy classifier", disable=not progress):
        params, opt_state, loss = step(params, opt_state, jax.random.fold_in(k_run, i))
        losses.append(loss)
    return params, np.asarray(jax.device_get(jnp.stack(losses)))


def classifier_log_prob(model, params, process: Process, y):
    """``log_prob(x, t) -> (B,)``: ``log p(y | x_t)`` of a trained noisy classifier, for
    :func:`jaxdiff.guidance.classifier_guidance` (``y``: int labels ``(B,)``)."""
    y = jnp.asarray(y, jnp.int32)

    def log_prob(x, t):
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        logits = model.apply({"params": params}, x, process.net_time(t), train=False)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]

    return log_prob


def noisy_accuracy(model, params, process: Process, data, labels, t, key) -> float:
    """Accuracy of the classifier on ``data`` noised to time ``t`` (a float)."""
    data = jnp.asarray(data, jnp.float32)
    tt = jnp.full((data.shape[0],), t, jnp.float32)
    eps = jax.random.normal(key, data.shape, data.dtype)
    logits = model.apply({"params": params}, process.marginal(data, tt, eps), process.net_time(tt), train=False)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels)))
