"""InceptionV3 of the FID reference implementations, in Flax (inference only).

The network is the TensorFlow graph ``inception-2015-12-05`` that Heusel et al.'s TTUR FID code
(and hence ADM's and EDM's evaluators) use, as ported to PyTorch by pytorch-fid
(``pytorch_fid/inception.py``, ``fid_inception_v3``): torchvision's Inception3 layout with 1008
classes, no auxiliary head, and the FID patches --

* ``FIDInceptionA`` / ``FIDInceptionC`` / ``FIDInceptionE_1``: the pool branch averages over
  the valid pixels only (``count_include_pad=False``, TensorFlow's average pool);
* ``FIDInceptionE_2`` (``Mixed_7c``): the pool branch is a 3x3 *max* pool.

Inputs are resized to 299x299 bilinearly (``F.interpolate(..., align_corners=False)``, i.e.
half-pixel centres, no antialiasing). Outputs: ``pool3`` (N, 2048), the features FID uses, and
``logits`` (N, 1008) = ``fc(pool3)``, the logits the Inception Score uses.

Module and parameter names follow the PyTorch ``state_dict``, so :func:`convert_state_dict`
is a renaming plus transposes. Weights are never downloaded: convert a local copy of
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` once with

    python -m jaxdiff.metrics.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz

(reads it with ``torch.load(weights_only=True)``; needs torch) and point ``--inception_weights``
or ``$JAXDIFF_INCEPTION_WEIGHTS`` at the ``.npz``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

__all__ = ["InceptionV3", "convert_state_dict", "convert_pth", "save_variables", "load_variables",
           "resolve_weights_path", "ENV_VAR", "NUM_CLASSES"]

ENV_VAR = "JAXDIFF_INCEPTION_WEIGHTS"
NUM_CLASSES = 1008
PRECISION = jax.lax.Precision.HIGHEST


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: conv (no bias) -> BatchNorm (eps 1e-3, running stats) -> ReLU."""

    features: int
    kernel_size: Any
    stride: Any = 1
    padding: Any = 0

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.stride),
                    padding=((ph, ph), (pw, pw)), use_bias=False, precision=PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x):
    # TensorFlow's average pool: padded pixels are not counted (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, 3, stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (``pool="avg"``, TF average pool) or ``FIDInceptionE_2`` (``pool="max"``)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            p = _avg_pool_3x3_same(x)
        else:
            p = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, 1, name="branch_pool")(p)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(x, size: Sequence[int]):
    """(N, H, W, C) -> (N, *size, C) as ``F.interpolate(mode="bilinear", align_corners=False)``
    (half-pixel centres, no antialiasing)."""
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, int(size[0]), int(size[1]), c), method="bilinear", antialias=False)


class InceptionV3(nn.Module):
    """pytorch-fid's ``InceptionV3`` (FID variant) -> ``{"pool3": (N, 2048), "logits": (N, 1008),
    "logits_unbiased": (N, 1008)}``.

    ``logits`` is pytorch-fid's ``fc(pool3)``; ``logits_unbiased`` is ``pool3 @ W`` without the
    fc bias, the logits the Inception Score is defined on (Salimans et al. 2016's code, which
    jaxdiff's evaluation feeds to :class:`jaxdiff.metrics.fid.InceptionScoreAccumulator`).

    Input: images (N, H, W, 3) (or 1 channel, repeated to 3) with values in [-1, 1]; they are
    resized to 299x299 first when ``resize_input`` (pytorch-fid's default). pytorch-fid takes
    [0, 1] and maps ``x -> 2x - 1``; the two resize/scale orders agree (both are affine).
    Call ``model.apply(variables, x)`` with ``variables = {"params", "batch_stats"}`` from
    :func:`load_variables`.
    """

    resize_input: bool = True

    @nn.compact
    def __call__(self, x):
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.concatenate([x, x, x], axis=-1)
        if self.resize_input:
            x = resize_bilinear(x, (299, 299))
        x = BasicConv2d(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = FIDInceptionC(128, name="Mixed_6b")(x)
        x = FIDInceptionC(160, name="Mixed_6c")(x)
        x = FIDInceptionC(160, name="Mixed_6d")(x)
        x = FIDInceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        fc = nn.Dense(NUM_CLASSES, precision=PRECISION, name="fc")
        logits = fc(pool3)
        # The Inception Score's logits: pool3 @ W without the fc bias, as in Salimans et al.'s
        # reference code (``tf.matmul(pool3, w)`` with w the softmax/logits MatMul's weights),
        # ADM's evaluator and torch-fidelity's ``logits_unbiased``.
        unbiased = jnp.dot(pool3, fc.variables["params"]["kernel"], precision=PRECISION)
        return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


# ------------------------------------------------------------------------------------------------
# Weights: PyTorch state_dict -> flat .npz -> Flax variables
# ------------------------------------------------------------------------------------------------

_BN = {"weight": ("params", "scale"), "bias": ("params", "bias"),
       "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def convert_state_dict(state_dict) -> dict[str, np.ndarray]:
    """pytorch-fid's ``fid_inception_v3().state_dict()`` -> flat ``{"params/Mixed_5b/...": array}``.

    Conv weights (O, I, kh, kw) become Flax kernels (kh, kw, I, O); ``fc.weight`` (1008, 2048) is
    transposed; BatchNorm ``weight/bias`` -> ``scale/bias`` and ``running_mean/var`` ->
    ``batch_stats`` ``mean/var``; ``num_batches_tracked`` is dropped. Any other key is an error.
    """
    flat = {}
    for key, value in state_dict.items():
        v = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[-2] == "conv" and parts[-1] == "weight":
            flat["params/" + "/".join(parts[:-1] + ["kernel"])] = np.transpose(v, (2, 3, 1, 0))
        elif parts[-2] == "bn" and parts[-1] in _BN:
            coll, name = _BN[parts[-1]]
            flat[f"{coll}/" + "/".join(parts[:-1] + [name])] = v
        elif parts[0] == "fc" and len(parts) == 2:
            flat["params/fc/" + ("kernel" if parts[1] == "weight" else "bias")] = v.T if v.ndim == 2 else v
        else:
            raise ValueError(f"unexpected key {key!r} in the Inception state_dict (is this pytorch-fid's "
                             f"pt_inception-2015-12-05 weight file?)")
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def _check_against_model(flat: dict[str, np.ndarray]) -> None:
    shapes = jax.eval_shape(InceptionV3(resize_input=False).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 75, 75, 3), jnp.float32))
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(jax.tree.map(lambda a: a, dict(shapes))).items()}
    got = {k: v.shape for k, v in flat.items()}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"Inception weights do not match the network: missing {missing[:5]}, unexpected {extra[:5]}")
    bad = [k for k in want if tuple(want[k]) != tuple(got[k])]
    if bad:
        raise ValueError(f"Inception weights with wrong shapes: {[(k, got[k], want[k]) for k in bad[:5]]}")


def save_variables(flat: dict[str, np.ndarray], path: str) -> str:
    """Writes the flat arrays of :func:`convert_state_dict` to an ``.npz`` (no pickle)."""
    _check_against_model(flat)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **flat)
    return path


def convert_pth(pth_path: str, out_path: str) -> str:
    """pytorch-fid's ``pt_inception-2015-12-05-*.pth`` -> jaxdiff's ``.npz`` (``torch.load(weights_only=True)``)."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover
        raise ImportError("converting the PyTorch Inception weights needs torch (pip install torch)") from e
    state_dict = torch.load(pth_path, map_location="cpu", weights_only=True)
    return save_variables(convert_state_dict(state_dict), out_path)


def resolve_weights_path(path: str | None = None) -> str:
    """``path``, else ``$JAXDIFF_INCEPTION_WEIGHTS``; an error that says what to do otherwise."""
    path = path or os.environ.get(ENV_VAR)
    how = ("jaxdiff never downloads them: get pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
           "(https://github.com/mseitzer/pytorch-fid/releases), convert it once with "
           "`python -m jaxdiff.metrics.inception pt_inception-2015-12-05-6726825d.pth inception_fid.npz` "
           f"and pass --inception_weights=inception_fid.npz or set {ENV_VAR}")
    if not path:
        raise FileNotFoundError(f"no Inception weights given; {how}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Inception weights {path!r} not found; {how}")
    if path.endswith(".pth"):
        raise ValueError(f"{path} is a PyTorch file; {how}")
    return path


def load_variables(path: str | None = None) -> dict:
    """Flax variables ``{"params", "batch_stats"}`` from a converted ``.npz`` (``allow_pickle=False``)."""
    path = resolve_weights_path(path)
    with np.load(path, allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    _check_against_model(flat)
    return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in flat.items()})


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        raise SystemExit("usage: python -m jaxdiff.metrics.inception PT_INCEPTION.pth OUT.npz")
    print(convert_pth(argv[0], argv[1]))


if __name__ == "__main__":
    main()
