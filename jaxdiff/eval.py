"""Evaluate a trained model as the papers do: stream samples through a feature network.

``evaluate_model`` generates ``num`` samples batch by batch (the jitted, batch-sharded sampler of
:mod:`jaxdiff.generate`), passes each batch through a feature extractor jitted with the same
sharding (every device extracts the features of its own samples), and folds the features into
running statistics on the host (:class:`jaxdiff.metrics.fid.StatsAccumulator`, the streaming
Inception Score, class-accuracy counts). Host memory does not grow with ``num``: only per-batch
feature vectors reach the host; the optional feature file for KID / precision-recall is a
memory-mapped ``.npy`` on disk.

``dataset_statistics`` does the same for a dataset, producing the reference ``.npz``
(``mu``, ``sigma``, optionally ``features``) that pytorch-fid and ADM use.

Feature extractors (:func:`get_extractor`):

* ``"inception"`` -- pytorch-fid's FID InceptionV3 (:mod:`jaxdiff.metrics.inception`), pool3
  features and 1008 logits. Samples are first quantized to 8 bits, as when they are written to
  PNG files and read back by pytorch-fid / ADM's evaluator.
* ``"digits"`` -- the 8x8 digits classifier (:mod:`jaxdiff.metrics.digits_classifier`), 64-d
  penultimate features and 10 logits; class-conditional samples also get ``class_accuracy``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxdiff import compile_options, parallel
from jaxdiff.metrics import fid as M

__all__ = ["FeatureExtractor", "get_extractor", "EXTRACTORS", "evaluate_model", "dataset_statistics",
           "compare_to_reference", "guidance_tag", "restore_for_sampling", "run_eval", "run_eval_sweep", "sweep_table",
           "run_stats"]

EXTRACTORS = ("inception", "digits")


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """``fn(variables, images) -> {"features": (B, dim), "logits": (B, K)}``: a pure jittable
    function of the network weights and a batch of images in [-1, 1]. The weights are passed as an
    argument (not closed over), so they are not baked into the compiled program as constants."""

    name: str
    fn: Callable
    variables: Any
    dim: int
    quantize: bool = False  # round to 8 bits first (samples as PNG files)
    # the logits are over the dataset's own classes (the digits classifier), so argmax vs the
    # requested label is a class accuracy; Inception's 1008 ImageNet logits are not
    logits_are_labels: bool = False

    def apply(self, variables, images):
        x = jnp.asarray(images, jnp.float32)
        if self.quantize:
            x = jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
        return self.fn(variables, x)

    def __call__(self, images):
        return self.apply(self.variables, images)


def get_extractor(name: str, *, inception_weights: str | None = None, digits_weights: str | None = None
                  ) -> FeatureExtractor:
    """The named feature extractor (``"inception"`` needs converted weights, see
    :func:`jaxdiff.metrics.inception.resolve_weights_path`)."""
    if name == "inception":
        from jaxdiff.metrics import inception

        model = inception.InceptionV3()

        def fn(variables, x):
            out = model.apply(variables, x)
            # the Inception Score's logits have no fc bias (Salimans et al. 2016's code)
            return {"features": out["pool3"], "logits": out["logits_unbiased"]}

        return FeatureExtractor("inception", fn, inception.load_variables(inception_weights), 2048, quantize=True)
    if name == "digits":
        from jaxdiff.metrics import digits_classifier

        model = digits_classifier.DigitsClassifier()

        def fn(params, x):
            if x.shape[1:] != (8, 8, 1):
                raise ValueError(f"--features digits scores 8x8x1 digits, got images of shape {x.shape[1:]}")
            return model.apply({"params": params}, x)

        return FeatureExtractor("digits", fn, digits_classifier.load_params(digits_weights),
                                digits_classifier.FEATURE_DIM, logits_are_labels=True)
    raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(EXTRACTORS)}")


class _Streams:
    """Host-side accumulators of one stream of (features, logits) batches."""

    def __init__(self, num: int, dim: int, *, splits: int, features_path: str | None, labels=None):
        self.stats = M.StatsAccumulator()
        self.inception_score = M.InceptionScoreAccumulator(num, splits) if num >= splits else None
        self.labels = labels
        self.correct = 0
        self.seen = 0
        self.features = None
        if features_path:
            os.makedirs(os.path.dirname(os.path.abspath(features_path)), exist_ok=True)
            self.features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float32, shape=(num, dim))

    def update(self, feats: np.ndarray, logits: np.ndarray) -> None:
        n = feats.shape[0]
        self.stats.update(feats)
        if self.inception_score is not None:
            self.inception_score.update(logits)
        if self.labels is not None:
            self.correct += int(np.sum(np.argmax(logits, 1) == self.labels[self.seen:self.seen + n]))
        if self.features is not None:
            self.features[self.seen:self.seen + n] = feats
        self.seen += n

    def result(self) -> dict:
        mu, sigma = self.stats.result()
        out = {"mu": mu, "sigma": sigma}
        if self.inception_score is not None:
            out["inception_score"], out["inception_score_std"] = self.inception_score.result()
        if self.labels is not None:
            out["class_accuracy"] = self.correct / self.seen
        if self.features is not None:
            self.features.flush()
            out["features"] = self.features
        return out


def _on_mesh(tree, mesh):
    """``tree`` as it is where it already lives on ``mesh``'s devices, else replicated onto them."""
    devices = set(mesh.devices.flat)
    replicated = parallel.replicated(mesh)

    def place(a):
        sharding = getattr(a, "sharding", None)
        return a if sharding is not None and set(sharding.device_set) == devices else jax.device_put(a, replicated)

    return jax.tree.map(place, tree)


def _jit_extractor(extractor: FeatureExtractor, mesh):
    """``extract(images)``: the extractor jitted with the batch split over ``mesh`` (each device
    extracts the features of its own images), weights replicated."""
    sharding = parallel.batch_sharding(mesh)
    fn = compile_options.jit(extractor.apply, in_shardings=(parallel.replicated(mesh), sharding), out_shardings=sharding)
    variables = _on_mesh(extractor.variables, mesh)
    return lambda images: fn(variables, images)


def evaluate_model(config, model, params, num: int, key, *, sampler: str, num_steps: int,
                   extractor: FeatureExtractor, batch_size: int = 256, labels=None, grid_kind=None,
                   features_path: str | None = None, splits: int = 10, progress: bool = True, mesh=None,
                   **options) -> dict:
    """Streams ``num`` samples through ``extractor``; returns ``{"mu", "sigma", "inception_score",
    "inception_score_std", ["class_accuracy"], ["features"]}``.

    Batch ``b`` uses ``fold_in(key, b)`` and labels ``0, 1, ..., C-1, 0, ...`` (class-conditional
    models), exactly as :func:`jaxdiff.generate.generate` does, so the samples are the ones
    ``generate`` returns. ``features_path``: also write all features to that ``.npy`` (memory-mapped).
    For an adaptive sampler (:data:`jaxdiff.samplers.nfe.ADAPTIVE`) the result also holds ``nfe``,
    the mean over the batches of the model calls each took.
    """
    from jaxdiff.generate import class_labels, make_sample_fn
    from jaxdiff.samplers.nfe import ADAPTIVE

    adaptive = sampler in ADAPTIVE
    if adaptive:
        options = dict(options, return_nfe=True)

    mesh = mesh or parallel.make_mesh()
    batch = int(math.ceil(min(int(batch_size), num) / mesh.size) * mesh.size)
    sample = make_sample_fn(config, model, sampler, num_steps, batch, grid_kind=grid_kind, mesh=mesh, **options)
    extract = _jit_extractor(extractor, mesh)
    params = _on_mesh(params, mesh)
    if labels is None:
        labels = class_labels(config, num)
    # class accuracy only where the extractor's logits are the dataset's classes (digits)
    streams = _Streams(num, extractor.dim, splits=splits, features_path=features_path,
                       labels=np.asarray(labels) if labels is not None and extractor.logits_are_labels else None)
    n_batches = int(math.ceil(num / batch))
    nfes = []
    for b in tqdm(range(n_batches), desc=f"eval ({sampler}, {num_steps} steps, {extractor.name})",
                  disable=not progress or jax.process_index() != 0, dynamic_ncols=True):
        y = None
        if labels is not None:
            y = jnp.asarray(np.resize(np.asarray(labels[b * batch:(b + 1) * batch], np.int32), batch))
        images = sample(params, jax.random.fold_in(key, b), y)
        if adaptive:
            images, nfe = images
            nfes.append(int(nfe))
        out = extract(images)
        keep = min(batch, num - b * batch)
        streams.update(parallel.gather_to_host(out["features"])[:keep],
                       parallel.gather_to_host(out["logits"])[:keep])
    result = streams.result()
    if adaptive:
        result["nfe"] = float(np.mean(nfes))
    return result


def dataset_statistics(source, extractor: FeatureExtractor, *, batch_size: int = 256, splits: int = 10,
                       features_path: str | None = None, progress: bool = True, mesh=None) -> dict:
    """Feature statistics of every example of ``source`` (a :mod:`jaxdiff.data` source: ``len`` and
    ``source[indices]["image"]`` in [-1, 1]), in order, streamed batch by batch.

    Single-process: the batches are host arrays of the whole global batch (multi-host runs would
    need each process to feed its own shard, as the trainer does; not implemented)."""
    mesh = mesh or parallel.make_mesh()
    num = len(source)
    batch = int(math.ceil(min(int(batch_size), num) / mesh.size) * mesh.size)
    extract = _jit_extractor(extractor, mesh)
    labels = getattr(source, "labels", None)
    streams = _Streams(num, extractor.dim, splits=splits, features_path=features_path)
    correct = 0
    for start in tqdm(range(0, num, batch), desc=f"reference statistics ({extractor.name})",
                      disable=not progress or jax.process_index() != 0, dynamic_ncols=True):
        idx = np.arange(start, min(start + batch, num))
        images = np.asarray(source[idx]["image"], np.float32)
        keep = images.shape[0]
        if keep < batch:  # one compiled shape: pad the last batch
            images = np.concatenate([images, np.zeros((batch - keep,) + images.shape[1:], np.float32)])
        out = extract(jnp.asarray(images))
        logits = parallel.gather_to_host(out["logits"])[:keep]
        streams.update(parallel.gather_to_host(out["features"])[:keep], logits)
        if labels is not None:
            correct += int(np.sum(np.argmax(logits, 1) == np.asarray(labels)[idx]))
    result = streams.result()
    result["num"] = num
    if labels is not None and extractor.logits_are_labels:
        result["class_accuracy"] = correct / num
    return result


def compare_to_reference(result: dict, ref: dict, *, kid_subsets: int = 100, kid_subset_size: int = 1000,
                         pr_k: int = 3) -> dict:
    """Scalar metrics of an :func:`evaluate_model` result against reference statistics
    (:func:`jaxdiff.metrics.fid.load_stats`): FID always; KID and precision / recall when both
    sides have ``features``; IS and class accuracy carried over."""
    out = {"fid": M.frechet_distance(result["mu"], result["sigma"], ref["mu"], ref["sigma"])}
    for k in ("inception_score", "inception_score_std", "class_accuracy"):
        if k in result:
            out[k] = float(result[k])
    if result.get("features") is not None and ref.get("features") is not None:
        out["kid"], out["kid_std"] = M.kernel_inception_distance(
            result["features"], ref["features"], num_subsets=kid_subsets, subset_size=kid_subset_size)
        out["precision"], out["recall"] = M.precision_recall(ref["features"], result["features"], k=pr_k)
    return out



# ------------------------------------------------------------------------------------------------
# The `jaxdiff eval` / `jaxdiff stats` commands
# ------------------------------------------------------------------------------------------------

def restore_for_sampling(workdir: str, which: str = ""):
    """``(config, model, params, step)`` of the latest checkpoint of a ``jaxdiff train`` workdir
    (the EMA copy ``which``, default the first one, or ``"params"``, as ``jaxdiff sample`` does).

    Only that copy is read from the checkpoint
    (:meth:`jaxdiff.checkpoint.CheckpointManager.restore_subtree`): not the optimizer moments or
    the other EMA copies. The EMA names come from the checkpoint's config; an unknown ``which``
    raises ValueError naming them.

    The config is the one saved with that checkpoint (not ``workdir/config.json``, which a later
    ``jaxdiff train`` on the same workdir rewrites). The params are restored onto this process's
    devices -- replicated, or fsdp-sharded when the run's ``mesh.fsdp`` divides the device
    count -- whatever number of devices wrote them.
    """
    from jaxdiff.checkpoint import CheckpointManager, config_from_json
    from jaxdiff.modeling import build_model
    from jaxdiff.train.loop import abstract_train_state, sampling_key, sampling_params
    from jaxdiff.train.state import make_optimizer

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoints under {workdir}: is it a jaxdiff train workdir?")
    ckpt = CheckpointManager(workdir, save_every=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
        config = config_from_json(ckpt.restore_config(step))
        model = build_model(config)
        fsdp = int(config.mesh.get("fsdp", 1))
        mesh = parallel.make_mesh(-1, fsdp if fsdp > 0 and jax.device_count() % fsdp == 0 else 1)
        abstract, _ = abstract_train_state(config, model, make_optimizer(config), mesh)
        which = which or config.sample.get("params")
        params = ckpt.restore_subtree(sampling_params(abstract, which), sampling_key(abstract.ema, which), step)
    finally:
        ckpt.close()
    return config, model, params, int(step)


def guidance_tag(g: dict) -> str:
    """The part of an eval file's name that names its guidance settings: ``""`` unguided, else
    ``_cfg{scale}[_interval{lo}-{hi}][_rescale{r}][_ch{n}]``, so that evals which differ in any
    setting never overwrite each other."""
    if g["scale"] == 1.0:
        return ""
    tag = f"_cfg{g['scale']:g}"
    if g.get("interval") is not None:
        tag += f"_interval{g['interval'][0]:g}-{g['interval'][1]:g}"
    if g.get("rescale"):
        tag += f"_rescale{g['rescale']:g}"
    if g.get("channels"):
        tag += f"_ch{int(g['channels'])}"
    return tag


def _json_ready(d: dict) -> dict:
    return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in d.items()
            if not isinstance(v, np.ndarray)}


def run_eval(workdir: str, *, num: int, sampler: str | None = None, steps: int | None = None,
             ref: str | None = None, features: str = "inception", inception_weights: str | None = None,
             batch_size: int = 256, seed: int = 1, which: str = "", out: str | None = None,
             progress: bool = True, guidance: dict | None = None, variance: str | None = None,
             decode_batch: int | None = None, grid: str | None = None) -> dict:
    """``jaxdiff eval``: sample ``num`` images from ``workdir``'s latest checkpoint, score them
    against the reference statistics ``ref`` and write the result to a JSON file.

    ``guidance``: classifier-free guidance settings overriding ``config.sample.guidance_*``
    (``{"scale", "interval", "rescale"}``, see :func:`jaxdiff.generate.guidance_settings`).
    ``variance``: ``ddpm``'s reverse variance (``fixed_small``, ``fixed_large``, ``learned_range``;
    default :func:`jaxdiff.generate.ddpm_variance`), recorded in the result and, when given, in
    the file name. ``decode_batch``: each device decodes at most this many latents of a latent model at a time
    (default ``config.sample.decode_batch``; see :func:`jaxdiff.generate.make_sample_fn`).
    ``grid``: the time grid kind (:data:`jaxdiff.schedules.GRID_KINDS`; default
    ``config.sample.grid``, else the process's default), recorded in the result and, when given,
    in the file name.

    With ``features="digits"`` and no ``ref``, the reference is the digits the model trained on
    (the config's ``train`` split). KID and precision / recall are computed when ``ref`` holds
    ``features`` (``jaxdiff stats --save_features``); the samples' features then go to a
    memory-mapped ``.npy`` next to the JSON file. The result records ``nfe``, the denoiser
    evaluations per sample (:func:`jaxdiff.generate.sample_nfe`; for an adaptive sampler the mean
    over the batches of the model calls each took).
    """
    return run_eval_sweep(workdir, num=num, samplers=[sampler], steps=[steps], ref=ref, features=features,
                          inception_weights=inception_weights, batch_size=batch_size, seed=seed, which=which,
                          out=out, progress=progress, guidance=guidance, variance=variance,
                          decode_batch=decode_batch, grids=[grid])["results"][0]


def run_eval_sweep(workdir: str, *, num: int, samplers: list, steps: list, ref: str | None = None,
                   features: str = "inception", inception_weights: str | None = None, batch_size: int = 256,
                   seed: int = 1, which: str = "", out: str | None = None, progress: bool = True,
                   guidance: dict | None = None, variance: str | None = None,
                   decode_batch: int | None = None, grids: list | None = None, guidances: list | None = None) -> dict:
    """:func:`run_eval` for every (sampler, guidance, grid, steps) of ``samplers`` x ``guidances``
    x ``grids`` x ``steps`` -- the FID vs NFE tables of sampler papers, the FID vs guidance scale
    curves of guided models (``guidances``: a list of overrides, each applied on top of
    ``guidance``, e.g. ``[{"scale": s} for s in (1, 1.5, 3)]``; default ``[guidance]``) -- with the checkpoint restored, the feature network loaded and
    the reference statistics read once. Every pair samples from the same seed, so the initial
    noise is shared. Each setting writes its own JSON file as :func:`run_eval` does (``out`` only
    for a single one); with more than one, a Markdown table of them goes to
    ``WORKDIR/eval/sweep_<features>_<num>_<samplers>_<steps>[_<grids>][guidance][_variance].md``.
    ``None`` (or 0 steps) in ``samplers`` / ``steps`` / ``grids`` means the config's
    ``sample.sampler`` / ``sample.steps`` / ``sample.grid`` (else the process's default grid,
    :func:`jaxdiff.schedules.default_grid_kind`); each result records the grid kind it ran on.
    Every setting's grid is built (and its NFE counted) before any sampling, so a setting that
    does not fit the model fails at once. ``eval_seconds``: sampling and scoring of that setting;
    ``setup_seconds``: restoring the checkpoint, loading the feature network and the reference,
    counting the NFEs. ``nfe`` is an int for fixed-step samplers and a float (the mean over the
    batches) for adaptive ones, whose shared step size makes it depend on the batch size and the
    device count too.

    Returns ``{"results": [summary, ...], "table": path or None, "table_text": str or None}``."""
    import json

    from jaxdiff.generate import ddpm_variance, guidance_settings, sample_nfe, warn_if_null_class_untrained
    from jaxdiff.modeling import num_classes

    t0 = time.time()
    samplers, steps, grids = list(samplers) or [None], list(steps) or [None], list(grids or []) or [None]
    guidances = [{**(guidance or {}), **(gd or {})} for gd in guidances] if guidances else [guidance]
    if out and len(samplers) * len(steps) * len(grids) * len(guidances) > 1:
        raise ValueError("out names one result file; a sweep over several samplers, step counts, grids or guidance "
                         "settings writes one per setting")
    from jaxdiff.modeling import build_process
    from jaxdiff.schedules import GRID_KINDS, default_grid_kind

    for gk in grids:
        if gk is not None and gk not in GRID_KINDS:
            raise ValueError(f"unknown grid kind {gk!r}; valid: {', '.join(GRID_KINDS)}")
    extractor = get_extractor(features, inception_weights=inception_weights)  # missing weights: fail first
    config, model, params, step = restore_for_sampling(workdir, which)
    config_grid = str(config.sample.get("grid", "") or "") or None
    gs = [guidance_settings(config, gd) for gd in guidances]
    if any(g["scale"] != 1.0 for g in gs) and num_classes(config) == 0:
        raise ValueError("a guidance scale other than 1 needs a class-conditional model (model.num_classes > 0 "
                         "trained with diffusion.class_dropout > 0); this one is unconditional")
    if any(g["scale"] != 1.0 for g in gs):
        warn_if_null_class_untrained(config)
    settings = [(sm or config.sample.sampler, int(n or config.sample.steps), gk or config_grid, g)
                for sm in samplers for g in gs for gk in grids for n in steps]
    pairs = [s[:3] for s in settings]
    from jaxdiff.samplers import get as get_sampler

    for sampler, n, _ in pairs:
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {n}")
        get_sampler(sampler)  # an unknown name lists the valid ones, before any sampling
    if variance:  # before any sampling or reference statistics
        from jaxdiff.modeling import learns_variance

        for sampler, _, _ in pairs:
            if sampler != "ddpm":
                raise ValueError(f"--variance={variance} is an option of the ddpm sampler, not of {sampler!r} "
                                 "(pass --sampler ddpm)")
        if variance == "learned_range" and not learns_variance(config):
            raise ValueError("--variance=learned_range needs a model trained with diffusion.variance='learned_range'")
    options = {"variance": variance} if variance else {}
    if decode_batch is not None:
        options["decode_batch"] = int(decode_batch)
    tag = f"_{variance}" if variance else ""
    # every setting's grid built (make_grid's errors: a grid kind the process has not, too many
    # steps) and its NFE counted before any sampling
    process = build_process(config)
    nfe_of = {p: sample_nfe(config, p[0], p[1], grid_kind=p[2], **options) for p in dict.fromkeys(pairs)}
    if ref:
        reference = M.load_stats(ref)
        ref_dim = int(np.shape(reference["mu"])[-1])
        if ref_dim != int(extractor.dim):
            raise ValueError(f"the reference {ref} holds {ref_dim}-d features but --features {features} gives "
                             f"{extractor.dim}-d ones: make the reference with the same --features "
                             "(`jaxdiff stats --features ...`)")
    elif features == "digits":
        from jaxdiff.data import make_source

        reference = dataset_statistics(make_source(config.data, "train"), extractor, progress=False)
        ref = f"{config.data.name} train split"
    else:
        raise ValueError("jaxdiff eval needs --ref STATS.npz (reference statistics; compute them with `jaxdiff stats`)")
    setup_seconds = round(time.time() - t0, 1)
    results = []
    for sampler, n, gk, g in settings:
        t1 = time.time()
        gtag = f"_{gk}" if gk and gk != config_grid else ""  # as before: no tag for the config's own grid
        path = out or os.path.join(workdir, "eval", f"{features}_{sampler}_{n}{gtag}_{num}{guidance_tag(g)}{tag}.json")
        feats_path = os.path.splitext(path)[0] + "_features.npy" if "features" in reference else None
        result = evaluate_model(config, model, params, int(num), jax.random.PRNGKey(seed), sampler=sampler,
                                num_steps=n, extractor=extractor, batch_size=batch_size, grid_kind=gk,
                                features_path=feats_path, progress=progress, guidance_override=g, **options)
        summary = {"workdir": os.path.abspath(workdir), "checkpoint_step": step, "sampler": sampler, "steps": n,
                   "grid": gk or default_grid_kind(process, n),
                   "nfe": result.get("nfe", nfe_of[(sampler, n, gk)]),  # adaptive samplers: measured
                   "num_samples": int(num), "seed": int(seed), "features": features, "ref": ref, "guidance": g, **compare_to_reference(result, reference)}
        if sampler == "ddpm":
            summary["variance"] = ddpm_variance(config, variance)
        summary["eval_seconds"] = round(time.time() - t1, 1)  # sampling and scoring this setting
        summary["setup_seconds"] = setup_seconds
        summary = _json_ready(summary)
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(summary, f, indent=2)
        summary["out"] = path
        results.append(summary)
    table = text = None
    if len(pairs) > 1:
        def part(values):
            return "-".join(dict.fromkeys(str(v) for v in values))

        name = f"sweep_{features}_{num}_{part(p[0] for p in pairs)}_{part(p[1] for p in pairs)}"
        if any(gk for gk in grids):
            name += f"_{part(r['grid'] for r in results)}"
        if len(gs) == 1:
            name += guidance_tag(gs[0])
        else:
            name += "_guidance" + part(guidance_tag(g) or "_cfg1" for g in gs).replace("_cfg", "")
        table = os.path.join(workdir, "eval", f"{name}{tag}.md")
        text = sweep_table(results)
        if jax.process_index() == 0:
            with open(table, "w") as f:
                f.write(text)
    return {"results": results, "table": table, "table_text": text}


def sweep_table(results: list[dict]) -> str:
    """A Markdown table of eval summaries: one row per (sampler, guidance, grid, steps), with the NFE
    and every metric the summaries have (FID, IS, KID, precision / recall, class accuracy); a
    guidance column when the rows' guidance settings differ."""
    metrics = [k for k in ("fid", "inception_score", "kid", "precision", "recall", "class_accuracy")
               if any(k in r for r in results)]
    names = {"fid": "FID" if results and results[0].get("features") == "inception" else "FD",
             "inception_score": "IS", "kid": "KID", "precision": "precision", "recall": "recall",
             "class_accuracy": "class accuracy"}
    r0 = results[0]
    several = len({repr(sorted(r["guidance"].items())) for r in results}) > 1
    lines = [f"Checkpoint step {r0['checkpoint_step']} of `{r0['workdir']}`; {r0['num_samples']} samples per row, "
             f"seed {r0['seed']}, {r0['features']} features against {r0['ref']}"
             + ("." if several else f"; guidance {r0['guidance']}."), "",
             "| sampler | " + ("guidance | " if several else "") + "grid | steps | NFE | "
             + " | ".join(names[k] for k in metrics) + " | seconds |",
             "|---|---|---|---|" + "---|" * (len(metrics) + several) + "---|"]
    for r in results:
        cells = []
        for k in metrics:
            v = r.get(k)
            cells.append("" if v is None else f"{v:.4g}" if k != "inception_score" or "inception_score_std" not in r
                         else f"{v:.4g} +- {r['inception_score_std']:.2g}")
        nfe = "" if r.get("nfe") is None else f"{r['nfe']:g}"
        g = r["guidance"]
        gcol = f"{(guidance_tag(g) or '_cfg1')[1:]} | " if several else ""
        lines.append(f"| {r['sampler']} | {gcol}{r.get('grid', '')} | {r['steps']} | {nfe} | " + " | ".join(cells)
                     + f" | {r['eval_seconds']} |")
    return "\n".join(lines) + "\n"


def run_stats(source, out: str, *, features: str = "inception", inception_weights: str | None = None,
              batch_size: int = 256, save_features: bool = False, progress: bool = True) -> dict:
    """``jaxdiff stats``: reference statistics of a dataset source -> ``out`` (.npz: mu, sigma
    [, features])."""
    extractor = get_extractor(features, inception_weights=inception_weights)
    feats_path = os.path.splitext(out)[0] + "_features.npy" if save_features else None
    result = dataset_statistics(source, extractor, batch_size=batch_size, features_path=feats_path,
                                progress=progress)
    feats = np.asarray(result["features"]) if save_features else None
    if jax.process_index() == 0:
        M.save_stats(out, result["mu"], result["sigma"], features=feats)
    if feats_path and os.path.exists(feats_path):
        del result["features"]
        os.remove(feats_path)
    summary = {"out": out, "num": result["num"], "features": features, "dim": extractor.dim}
    for k in ("inception_score", "inception_score_std", "class_accuracy"):
        if k in result:
            summary[k] = float(result[k])
    return summary


def digits_score(config, images) -> dict | None:
    """``{"digits_fd", "digits_accuracy", "digits_num"}`` of samples of a digits config, else None.

    ``digits_fd``: Frechet distance between the digits classifier's features of ``images`` and of
    the training digits (the config's ``train`` split); ``digits_accuracy`` (class-conditional
    configs): the fraction classified as the label they were generated with (labels
    ``0, 1, ..., 9, 0, ...``, as :func:`jaxdiff.generate.generate` assigns them). The FD of
    N samples is biased upwards at small N; compare it with real held-out digits at the same N
    (README, "Evaluation").
    """
    images = np.asarray(images)
    if config.data.get("name") != "digits" or images.ndim != 4 or images.shape[1:] != (8, 8, 1) or len(images) < 2:
        return None
    from jaxdiff.data import make_source
    from jaxdiff.generate import class_labels
    from jaxdiff.metrics import digits_classifier as D

    train_images = make_source(config.data, "train").images
    out = {"digits_fd": D.digits_frechet_distance(images, train_images), "digits_num": int(len(images))}
    labels = class_labels(config, len(images))
    if labels is not None:
        out["digits_accuracy"] = D.class_accuracy(images, labels)
    return out
